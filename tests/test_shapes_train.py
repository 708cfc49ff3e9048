"""vidrd-shapes data and training: deterministic data, resumable training, export in the official layout."""
import json
from dataclasses import replace

import pytest
import torch

from tolerances import LATENT_SCALE_REL, RESUME_PARAMS
from vidrd.runtime.shapes import data
from vidrd.runtime.shapes.train import Trainer, TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_RUN = TrainConfig(vae_steps=3, vae_batch=2, unet_steps=3, unet_batch=2, warmup=2, scale_batches=1,
                       offset_noise_from=1, dir_steps=2, cont_steps=2, ship="ema")


def test_grammar_captions_and_held_out_set():
    caps = [str(c) for c in data.all_captions()]
    assert len(caps) == len(set(caps)) == 144
    assert all(data.parse(c) is not None and str(data.parse(c)) == c for c in caps)
    assert data.parse("a purple circle moving left on a black background") is None
    assert data.parse("a red circle moving left") is None
    assert len(data.HELD_OUT) == 14 and len(data.TRAIN_CAPTIONS) == 130
    assert not {str(c) for c in data.TRAIN_CAPTIONS} & data.HELD_OUT
    assert data.palette_distance() >= 120
    assert data.out_of_vocabulary("a red boat sailing on a gray lake") == ["boat", "lake", "sailing"]


def test_videos_are_deterministic_and_move_as_captioned():
    for cap in data.all_captions()[::7]:
        v = data.video(cap, seed=3)  # (F,3,H,W)
        assert v.shape == (8, 3, 64, 64) and 0 <= v.min() and v.max() <= 1
        assert torch.equal(v, data.video(str(cap), seed=3))
        bg = torch.tensor(data.BACKGROUNDS[cap.background]) / 255
        obj = ((v - bg[:, None, None]).abs().amax(dim=1) > 0.3).float()  # (F,H,W)
        ys, xs = torch.arange(64.0)[:, None], torch.arange(64.0)[None, :]
        cx = (obj * xs).sum((1, 2)) / obj.sum((1, 2))
        cy = (obj * ys).sum((1, 2)) / obj.sum((1, 2))
        dx, dy = data.VELOCITY[cap.direction]
        move_x, move_y = float(cx[-1] - cx[0]), float(cy[-1] - cy[0])
        assert move_x * dx + move_y * dy > 8, (str(cap), move_x, move_y)
    a, caps_a = data.batch(5, 3, seed=1)
    b, caps_b = data.batch(5, 3, seed=1)
    assert torch.equal(a, b) and caps_a == caps_b
    assert not torch.equal(a, data.batch(6, 3, seed=1)[0])


def test_long_tracks_and_their_clips_continue_and_turn():
    import numpy as np
    o, f = 4, data.FRAMES
    for seed in range(20):
        dirs = [str(d) for d in np.random.default_rng(seed).choice(data.DIRECTIONS, 3)]
        centres, r = data.track(dirs, np.random.default_rng([seed, 1]), f, o)
        c = np.array(centres)  # (T,2)
        assert c.shape == (f + 2 * (f - o), 2)
        assert (c >= 0.6 * r - 1e-9).all() and (c <= data.SIZE - 0.6 * r + 1e-9).all()  # inside the frame
        for k in range(1, len(c)):  # each move follows its segment's direction
            step = c[k] - c[k - 1]
            unit = np.array(data.VELOCITY[dirs[data.segment_of(k, f, o)]])
            assert np.allclose(step / np.linalg.norm(step), unit) and 1.0 < np.linalg.norm(step) <= 3.0
    vids, caps, first, before = data.window_batch(3, 16, seed=1)
    again = data.window_batch(3, 16, seed=1)
    assert torch.equal(vids, again[0]) and (caps, first, before) == again[1:]
    assert vids.shape == (16, f, 3, 64, 64) and set(first) == {0, o}
    assert all((b is None) == (k == 0) for b, k in zip(before, first))
    assert all(c in {str(t) for t in data.TRAIN_CAPTIONS} for c in caps)
    assert any(b is not None and b != data.parse(c).direction for b, c in zip(before, caps))  # a turn
    ys, xs = torch.arange(64.0)[:, None], torch.arange(64.0)[None, :]
    for v, c, k in zip(vids, caps, first):  # the frames a clip adds move as its caption says
        cap = data.parse(c)
        bg = torch.tensor(data.BACKGROUNDS[cap.background]) / 255
        obj = ((v - bg[:, None, None]).abs().amax(dim=1) > 0.3).float()  # (F,H,W)
        cx, cy = (obj * xs).sum((1, 2)) / obj.sum((1, 2)), (obj * ys).sum((1, 2)) / obj.sum((1, 2))
        dx, dy = data.VELOCITY[cap.direction]
        a = max(k - 1, 0)
        assert float(cx[-1] - cx[a]) * dx + float(cy[-1] - cy[a]) * dy > 5, (c, k)


def test_tracks_of_several_clips_leave_room_for_the_clips_after_a_first_clip():
    import numpy as np
    o, f = 4, data.FRAMES
    vids, caps, first, before = data.window_batch(5, 48, seed=2, overlap=o, turn=0.0, segments=3)
    again = data.window_batch(5, 48, seed=2, overlap=o, turn=0.0, segments=3)
    assert torch.equal(vids, again[0]) and (caps, first, before) == again[1:]
    assert set(first) == {0, o} and all((b is None) == (k == 0) for b, k in zip(before, first))
    assert all(b is None or b == data.parse(c).direction for b, c in zip(before, caps))  # turn 0: no turns
    ys, xs = torch.arange(64.0)[:, None], torch.arange(64.0)[None, :]
    room = []
    for v, c, k in zip(vids, caps, first):
        if k:
            continue
        cap = data.parse(c)
        bg = torch.tensor(data.BACKGROUNDS[cap.background]) / 255
        obj = ((v - bg[:, None, None]).abs().amax(dim=1) > 0.3).float()  # (F,H,W)
        cx, cy = (obj * xs).sum((1, 2)) / obj.sum((1, 2)), (obj * ys).sum((1, 2)) / obj.sum((1, 2))
        dx, dy = data.VELOCITY[cap.direction]
        speed = float(((cx[-1] - cx[0]) * dx + (cy[-1] - cy[0]) * dy) / (f - 1))
        end = float(cx[-1]) if dx else float(cy[-1])
        ahead = end if dx + dy < 0 else 64 - end
        room.append(ahead / speed)  # frames of travel left in the frame after the first clip
    assert room and min(room) >= 2 * (f - o) - 1  # two more clips of F-O new frames still fit (edge: 60% of r)
    with pytest.raises(ValueError, match="segments=4"):
        data.window_batch(0, 1, segments=4)
    with pytest.raises(ValueError, match="cont_segments=9"):
        TrainConfig(cont_segments=9).validate()


def test_continuation_phase_starts_from_a_trained_model(tmp_path):
    from vidrd.runtime.shapes import MODEL_DIR
    tr = Trainer(tmp_path, TINY_RUN, log=lambda m: None, bf16=False, start=MODEL_DIR)
    assert tr.state["phase"] == "continuation" and tr.state["step"] == 0
    before = _params(tr)
    assert tr.run() and tr.state["cont_done"] == 2 and len(tr.state["losses"]["continuation"]) == 1
    after = _params(tr)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    again = Trainer(tmp_path, TINY_RUN, log=lambda m: None, bf16=False, start=MODEL_DIR)  # resumes, not restarts
    assert again.state["phase"] == "done" and again.run() and all(torch.equal(after[k], again.ema[k]) for k in after)
    from vidrd.runtime.cli.train_shapes import export
    info = json.loads((export(again, tmp_path / "model") / "train.json").read_text())
    assert info["started_from"] == str(MODEL_DIR) and info["continuation_steps_done"] == 2
    assert info["start_model"] == json.loads((MODEL_DIR / "train.json").read_text())  # how the start model was made


def _params(trainer):
    return {k: v.clone() for k, v in trainer.ema.items()}


def test_training_resumes_where_it_stopped(tmp_path):
    whole = Trainer(tmp_path / "whole", TINY_RUN, log=lambda m: None, bf16=False)
    assert whole.run()
    part = Trainer(tmp_path / "part", TINY_RUN, log=lambda m: None, bf16=False)
    assert not part.run(stop_after=0.0)  # one step, a checkpoint, stop
    assert part.state["step"] == 1
    resumed = Trainer(tmp_path / "part", TINY_RUN, log=lambda m: None, bf16=False)
    assert resumed.state["step"] == 1 and resumed.run()
    a, b = _params(whole), _params(resumed)
    assert all(torch.allclose(a[k], b[k], atol=RESUME_PARAMS) for k in a)
    assert whole.state["scale"] == pytest.approx(resumed.state["scale"], rel=LATENT_SCALE_REL)
    assert len(whole.state["losses"]["unet"]) == 1
    with pytest.raises(ValueError, match="other settings"):
        Trainer(tmp_path / "part", TrainConfig(), log=lambda m: None)


def test_direction_phase_continues_a_run_from_before_it_existed(tmp_path):
    from dataclasses import replace

    from vidrd.runtime.shapes.train import STATE, with_direction
    assert with_direction("a red circle moving left on a black background", 1) == \
        "a red circle moving right on a black background"
    assert with_direction("a red circle moving down on a gray background", 1) == \
        "a red circle moving left on a gray background"
    assert with_direction("", 2) == ""
    old = Trainer(tmp_path, replace(TINY_RUN, dir_steps=0), log=lambda m: None, bf16=False)
    assert old.run() and old.state.get("dir_done", 0) == 0
    saved = torch.load(tmp_path / STATE, weights_only=True)
    for k in [k for k in saved["config"] if k.startswith("dir_")]:  # as written before phase 3 existed
        del saved["config"][k]
    torch.save(saved, tmp_path / STATE)
    logs = []
    new = Trainer(tmp_path, TINY_RUN, log=logs.append, bf16=False)
    assert any("predates the settings" in m for m in logs)
    before = _params(new)
    assert new.run() and new.state["dir_done"] == 2 and len(new.state["losses"]["direction"]) == 1
    after = _params(new)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    again = Trainer(tmp_path, TINY_RUN, log=lambda m: None, bf16=False)
    assert again.run() and all(torch.equal(after[k], again.ema[k]) for k in after)  # nothing left to do


def test_export_is_fp16_official_layout_and_loads(tmp_path):
    from vidrd.ref.weights import load_dir
    from vidrd.runtime.cli.train_shapes import export

    trainer = Trainer(tmp_path / "run", TINY_RUN, log=lambda m: None, bf16=False)
    trainer.run()
    out = export(trainer, tmp_path / "run" / "model")
    from safetensors.torch import load_file
    state = load_file(str(out / "ModelT2V.safetensors"))
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16}
    assert sum(p.stat().st_size for p in out.rglob("*")) <= 24 * 2 ** 20
    model = load_dir(out)
    assert model.config.vae.scaling_factor == pytest.approx(trainer.state["scale"], rel=LATENT_SCALE_REL)
    ids = model.tokenizer("a red circle moving left on a black background").input_ids
    assert len(ids) == 2 + 9  # every grammar word is one token
    info = json.loads((out / "train.json").read_text())
    assert info["phase"] == "done" and info["direction_steps_done"] == 2 and info["continuation_steps_done"] == 2
    assert torch.allclose(model.unet.conv_in.weight, trainer.ema["unet.conv_in.weight"].half().float())
    raw = Trainer(tmp_path / "run", replace(TINY_RUN, ship="raw"), log=lambda m: None, bf16=False)
    last = raw.model.unet.conv_in.weight.detach().clone()  # the last step's weights, as resumed
    assert not torch.equal(last, raw.ema["unet.conv_in.weight"])
    assert torch.equal(raw.trained_model().unet.conv_in.weight, last)


def test_train_shapes_cli_rejects_bad_values(tmp_path, capsys):
    from vidrd.runtime.cli import main
    assert main(["train-shapes", "--out", str(tmp_path / "r"), "--unet-batch", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unet_batch=0" in err[0]
    assert not (tmp_path / "r").exists()
