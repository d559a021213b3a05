"""What a run asks of the machine, checked before any work: memory and threads.

    check_threads(n, "--threads")                  # ValueError above MAX_THREADS_PER_CORE per core
    check_memory(cfg, model_cfg, workers)          # ValueError if the run cannot fit, naming the flag

Every size setting is a number in an open range ([1, inf)), so `--batch-size 20000`, `--d-model
40000` or `--dilations 1,4,100000000000` pass the range checks and then ask NumPy for terabytes:
a MemoryError after minutes, or a machine pushed into swap. So before the data is read or a folder
made, the memory a run needs is estimated from its settings (estimate(): the model with its
gradients, optimizer moments and EMA; one training step's activations; the head's buffers) and
compared with the memory available (MemAvailable in /proc/meminfo, lowered by a cgroup's limit in a
container; os.sysconf elsewhere). If it does not fit, one line says how much is needed and
available and names the setting that takes the most: the flag whose halving saves the most.

The estimate counts what the code allocates (the arrays each op caches for its backward, the conv's
left-padded input, the head's (rows, V) chunk per thread), so it is within a small factor of the
real peak: tests/test_robust.py measures both with tracemalloc. It is meant to catch sizes that
cannot work, not to fill memory to the last byte: a run must fit with FIT = 0.9 of what is free.
"""
import math
import os

from .fast.threads import available_cores
from .model import n_hier_classes, param_shapes

MAX_THREADS_PER_CORE = 4          # more threads than this per core only adds switching and memory
FIT = 0.9                         # share of the available memory a run may plan to use
HEAD_CHUNK = 1024                 # rows of logits per thread at a time (fast/head.py's DEFAULT_CHUNK)


def check_threads(n, flag="--threads", n_cores=None):
    """A ValueError when n threads per process are beyond reason for this machine (more than
    MAX_THREADS_PER_CORE per core); a one-line note on stderr when they are more than its cores
    (each step gets slower, not faster). n = 0 means all cores."""
    import sys
    n_cores = n_cores or available_cores()
    top = MAX_THREADS_PER_CORE * n_cores
    if n > top:
        raise ValueError(f"{flag} {n:,} is more than {MAX_THREADS_PER_CORE} per core of the {n_cores} core(s) this "
                         f"process may use (at most {top}): use {flag} {n_cores}, or 0 for all of them")
    if n > n_cores:
        print(f"note: {flag} {n} is more than the {n_cores} core(s) this process may use: the steps will be "
              f"slower, not faster; {flag} 0 uses all of them", file=sys.stderr)


def available_memory():
    """Bytes this process can still allocate without swapping, or None when unknown: Linux's
    MemAvailable, lowered by the cgroup's limit (memory.max - memory.current) in a container;
    elsewhere the free pages (os.sysconf)."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    try:                                  # cgroup v2: the container's own limit
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                avail = min(avail, int(limit) - int(f.read().strip()))
    except (OSError, ValueError):
        pass
    return max(0, avail)


def estimate(cfg, model_cfg, workers=1):
    """Bytes a training run of the settings `cfg` (TrainConfig) and `model_cfg` needs, in parts:
    {"model": weights, gradients, optimizer moments, EMA; "step": one step's activations and the
    head's buffers}. Python integers throughout: a size of 10**30 gives a number, not an overflow."""
    item = 8 if cfg.dtype == "float64" else 4
    V, C, H = model_cfg.vocab_size, model_cfg.d_model, model_cfg.glu_hidden
    K, R = model_cfg.kernel_size, model_cfg.n_recursions
    n_params = sum(math.prod(s) for s in param_shapes(model_cfg).values())
    body = sum(math.prod(s) for k, s in param_shapes(model_cfg).items() if k.startswith("block."))
    # weights + gradients + two moments (AdamW m, v; NorMuon m, v) [+ the EMA's copy]; the head's
    # dE and a buffer for the dE of later chunks; one set of body gradients per worker thread
    model = item * (n_params * (4 + (1 if cfg.ema else 0)) + 2 * V * C + workers * body)
    lengths = cfg.curriculum or (cfg.seq_len,)
    step = 0
    for T in lengths:                     # constant tokens per step: the batch shrinks as T grows
        B = max(1, cfg.batch_size * cfg.seq_len // T)
        N = B * T
        # per application of the block: the norms and residuals (~6 C per token), each ConvMixer
        # layer (norm, gate and value outputs, sigmoid cache: ~6 C per token) with the left-padded
        # input cached by both of its convs (2 (T + (K-1) D) C per sequence), the GLU (~4 H + 2 C)
        pad = sum(2 * B * (T + (K - 1) * D) * C for D in model_cfg.dilations)
        block = N * (6 * C + 6 * C * len(model_cfg.dilations) + 4 * H + 2 * C) + pad
        acts = R * block + 4 * N * C      # the embedding, the final norm, dh
        if model_cfg.head == "full":
            rows = min(HEAD_CHUNK, -(-N // max(1, workers)))
            head = workers * rows * V     # a (rows, V) logits buffer per thread
        else:
            n_cls = n_hier_classes(model_cfg)
            head = N * (n_cls + 2 * (-(-V // n_cls)))      # class logits, and a class's token logits
        step = max(step, item * (acts + head) + 8 * 2 * N)  # + int64 inputs and targets
    return {"model": model, "step": step}


def human(n):
    if n >= 2 ** 50:                      # a size typed as 10**30: Python's int is exact, a float overflows
        return f"10^{len(str(int(n))) - 1} bytes"
    for unit, size in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n} B"


# the size settings a message may name: (the dataclass that holds it, its field)
SIZE_FLAGS = (("model", "d_model"), ("model", "glu_hidden"), ("model", "dilations"), ("model", "kernel_size"),
              ("model", "n_recursions"), ("model", "hier_classes"), ("train", "batch_size"), ("train", "seq_len"),
              ("train", "curriculum"))


def biggest_flag(cfg, model_cfg, workers):
    """The size setting a message should name: the one whose default value saves the most memory
    (the setting someone raised), or, when every one is at or below its default, the one whose
    halving saves the most. -> (field name, value)."""
    import dataclasses
    base = sum(estimate(cfg, model_cfg, workers).values())
    for change in ("default", "half"):
        best, saved = None, 0
        for owner, name in SIZE_FLAGS:
            obj = cfg if owner == "train" else model_cfg
            value = getattr(obj, name)
            if not value:
                continue
            if change == "default":
                new = next(f.default for f in dataclasses.fields(obj) if f.name == name)
            else:
                new = tuple(max(1, v // 2) for v in value) if isinstance(value, tuple) else max(1, value // 2)
            try:
                changed = dataclasses.replace(obj, **{name: new})
            except (ValueError, TypeError):   # e.g. a d_model no longer divisible by conv_groups
                try:
                    changed = dataclasses.replace(obj, **{name: new, "conv_groups": 1})
                except (ValueError, TypeError):
                    continue
            c, m = (changed, model_cfg) if owner == "train" else (cfg, changed)
            gain = base - sum(estimate(c, m, workers).values())
            if gain > saved:
                best, saved = (name, value), gain
        if best is not None:
            return best
    return ("batch_size", cfg.batch_size)


def check_memory(cfg, model_cfg, workers=1, processes=1, available=None):
    """A ValueError naming the flag to lower when the run's estimate (times the processes on this
    machine) exceeds FIT of the available memory. Nothing is checked when that is unknown."""
    from .config import _short, flag
    available = available_memory() if available is None else available
    if available is None:
        return
    parts = estimate(cfg, model_cfg, workers)
    need = processes * sum(parts.values())
    if need <= FIT * available:
        return
    name, value = biggest_flag(cfg, model_cfg, workers)
    shown = _short(",".join(map(str, value)) if isinstance(value, tuple) else str(value))
    raise ValueError(f"this run needs about {human(need)} of memory (model and optimizer {human(parts['model'])}, "
                     f"one step {human(parts['step'])}" + (f", x {processes} processes" if processes > 1 else "")
                     + f") but {human(available)} is available: lower {flag(name)} ({shown}), which takes the most")


def generation_bytes(model_cfg, item=4, prompt_len=1):
    """Bytes generate.py needs: the weights, the conv ring buffers ((K-1) D rows of C per layer and
    recursion) and the prompt pass (one sequence, no backward)."""
    V, C, H = model_cfg.vocab_size, model_cfg.d_model, model_cfg.glu_hidden
    K, R = model_cfg.kernel_size, model_cfg.n_recursions
    n_params = sum(math.prod(s) for s in param_shapes(model_cfg).values())
    rings = R * sum((K - 1) * D * C for D in model_cfg.dilations)
    prompt = prompt_len * (8 * C + 4 * H + V) + sum(2 * (prompt_len + (K - 1) * D) * C for D in model_cfg.dilations)
    return item * (2 * n_params + rings + prompt)


def check_generation(model_cfg, item=4, prompt_len=1, where="this model", available=None):
    """A ValueError when generating with `model_cfg` cannot fit in the available memory."""
    available = available_memory() if available is None else available
    need = generation_bytes(model_cfg, item, prompt_len)
    if available is not None and need > FIT * available:
        raise ValueError(f"{where} needs about {human(need)} of memory (d_model {model_cfg.d_model}, dilations "
                         f"{','.join(map(str, model_cfg.dilations))}"
                         + (f", {prompt_len:,} tokens at once" if prompt_len > 1 else "")
                         + f") but {human(available)} is available")
