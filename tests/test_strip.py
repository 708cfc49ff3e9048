"""`vidrd strip`: frames side by side in one PNG, exactly the frames of the video; bad values refused up front."""
import numpy as np
import pytest

from vidrd.runtime.cli import main
from vidrd.runtime.video_io import VideoWriter, read_video


@pytest.fixture
def frames_dir(tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(6, 16, 24, 3), dtype=np.uint8)  # (T,H,W,3)
    with VideoWriter(tmp_path / "clip") as w:  # a folder of PNG frames: lossless
        w.write(frames)
    return tmp_path / "clip", frames


def test_strip_tiles_every_nth_frame_in_rows(frames_dir, tmp_path):
    video, frames = frames_dir
    out = tmp_path / "strip.png"
    assert main(["strip", str(video), "-o", str(out), "--every", "2", "--columns", "2", "--scale", "2"]) == 0
    image = read_video(out)[0]  # (H,W,3)
    h, w, gap = 32, 48, 2
    assert image.shape == (2 * h + gap, 2 * w + gap, 3)
    for k, frame in enumerate(frames[::2]):  # frames 0, 2, 4 at row k // 2, column k % 2
        y, x = (k // 2) * (h + gap), (k % 2) * (w + gap)
        assert np.array_equal(image[y:y + h:2, x:x + w:2], frame)
    assert (image[h + gap:, w + gap:] == 40).all()  # the empty fourth cell is background
    one_row = tmp_path / "row.png"
    assert main(["strip", str(video), "-o", str(one_row)]) == 0
    assert read_video(one_row)[0].shape == (16, 6 * 24 + 5 * gap, 3)


@pytest.mark.parametrize("args, says", [(["--every", "0"], "--every=0"), (["--scale", "99"], "--scale=99"),
                                        (["--columns", "-1"], "--columns=-1")])
def test_strip_refuses_bad_values(frames_dir, tmp_path, capsys, args, says):
    video, _ = frames_dir
    assert main(["strip", str(video), "-o", str(tmp_path / "s.png"), *args]) == 2
    assert says in capsys.readouterr().err and not (tmp_path / "s.png").exists()


def test_strip_keeps_an_existing_file_without_force(frames_dir, tmp_path, capsys):
    video, _ = frames_dir
    out = tmp_path / "s.png"
    out.write_bytes(b"mine")
    assert main(["strip", str(video), "-o", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and out.read_bytes() == b"mine"
    assert main(["strip", str(tmp_path / "missing.mp4"), "-o", str(tmp_path / "t.png")]) == 2
    assert main(["strip", str(video), "-o", str(tmp_path / "t.jpg")]) == 2
