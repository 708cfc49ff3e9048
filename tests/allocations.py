"""The allocation check of the step-loop tests: what a profiled run allocated outside the backend calls."""

BACKEND = "vidrd::backend"  # the record_function label the tests put around every backend call


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
