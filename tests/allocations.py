"""The allocation check of the step-loop tests: what a profiled run allocated outside the backend calls."""

from torch.profiler import record_function

from vidrd.runtime.backends import Backend

BACKEND = "vidrd::backend"  # the record_function label the tests put around every backend call


class Recorded(Backend):
    """A real backend whose calls are marked in the profiler, so the loop's own allocations can be told apart."""

    def __init__(self, backend):
        self.backend, self.dtype, self.device = backend, backend.dtype, backend.device
        self.frame_timesteps = backend.frame_timesteps

    def __call__(self, *args):
        with record_function(BACKEND):
            self.backend(*args)


def outside_backend(prof) -> list[tuple]:
    """(op, bytes, first two parents) of every CPU allocation in `prof` (torch.profiler, profile_memory=True) that
    is neither a BACKEND region nor inside one."""
    allocs = []
    for e in prof.events():
        if e.cpu_memory_usage > 0 and e.name != BACKEND:
            chain, p = [], e.cpu_parent
            while p is not None:
                chain.append(p.name)
                p = p.cpu_parent
            if BACKEND not in chain:
                allocs.append((e.name, e.cpu_memory_usage, chain[:2]))
    return allocs
