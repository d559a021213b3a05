"""The run folder, --out: one run per folder, and no run ever lost to another.

    with run_folder(out, resuming, overwrite):   # train.py's run, holding the folder (run.py)
        ...
    path, out = resume_target(args.resume, args.out, out_given)   # what --resume [CHECKPOINT|FOLDER] means
    run_id = check_resume(out, path, meta)        # refuses to write one run's state over another's

The rules, each a mechanism rather than a case:
  - One run per folder: a lock that names its holder (fileio.folder_lock), gone with its process.
  - Nothing is deleted before its replacement exists. --overwrite moves the old run's files to
    OUT/.replaced/; they are deleted once the new run has written its first checkpoint (commit(),
    called by every checkpoint write), and put back if it ends before that (a bad --data, a
    diverged first step, Ctrl-C). A run killed outright (kill -9) in between is settled by the next
    start on the folder, the same way: a checkpoint of the new run decides.
  - A resume never writes one run's state over another's. Each run has an id (the checkpoint's run_id,
    saved in every checkpoint); resuming a checkpoint into a folder that holds a run with another
    id is refused, and so is resuming an older checkpoint of a run (best.npz) over a latest.npz
    that is further ahead. A checkpoint resumed into another folder than its own starts a branch
    there, with an id of its own.
  - No litter: a folder made for a run that failed before writing anything is removed again.
"""
import contextlib
import os
import shutil
import uuid

from .checkpoint import BEST, LATEST, CheckpointError, check_replaceable, resolve
from .fileio import FolderBusy, folder_lock, remove_stale_temps

RUN_FILES = (LATEST, BEST, "log.jsonl", "loss.png", "report.md")
REPLACED = ".replaced"          # an overwritten run's files, until the new run's first checkpoint
COMPLETE = ".complete"          # in REPLACED: every old file is in it (the new run may write)


def new_run_id():
    return uuid.uuid4().hex[:16]


@contextlib.contextmanager
def run_folder(out, resuming=False, overwrite=False):
    """The run folder `out`, held for the block: made if needed, locked so that a second run on it
    refuses, the temporary files of a killed run removed, a killed --overwrite settled. A new run
    refuses a folder that holds another run's files, unless `overwrite` (then they are moved aside
    until it has a checkpoint of its own)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise CheckpointError(f"--out {out} is a file, not a folder: choose another --out")
    with contextlib.ExitStack() as stack:
        made = not os.path.lexists(out)
        try:
            os.makedirs(out, exist_ok=True)
            if made:
                stack.callback(_remove_if_empty, out)          # last: after the lock is released
            stack.enter_context(folder_lock(out, "a training run"))
        except FolderBusy as e:
            raise CheckpointError(f"--out {e}") from None
        except OSError as e:
            raise CheckpointError(f"cannot write to --out {out} ({e.strerror or e}): choose a folder "
                                  f"you can write to") from None
        stack.callback(settle, out, True)                      # first: while the lock is held
        settle(out)
        for path in remove_stale_temps(out):
            print(f"removed {path}: a checkpoint that a killed run did not finish writing")
        old = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
        if old and not resuming:
            if not overwrite:
                raise CheckpointError(f"{out}/ already holds a run ({', '.join(old)}): continue it with "
                                      f"--resume, start over with --overwrite, or choose another --out")
            _move_aside(out, old)
        yield out


def _move_aside(out, names):
    """Move the old run's files into OUT/.replaced/, then mark the move complete (COMPLETE): only then
    may the new run write. A move cut short (kill -9) has no mark and is simply undone."""
    aside = os.path.join(out, REPLACED)
    os.makedirs(aside, exist_ok=True)
    for f in names:
        os.replace(os.path.join(out, f), os.path.join(aside, f))
    with open(os.path.join(aside, COMPLETE), "w"):
        pass
    print(f"--overwrite: the previous run ({', '.join(names)}) is kept in {aside}/ until this run saves its "
          f"first checkpoint, and put back if it ends before")


def has_checkpoint(out):
    return any(os.path.exists(os.path.join(out, f)) for f in (LATEST, BEST))


def commit(out):
    """The new run has a checkpoint: the run it replaced (--overwrite) can go. Renamed first, then
    deleted, so that a kill in the middle never leaves a half-deleted .replaced/ to be put back."""
    aside = os.path.join(out, REPLACED)
    if os.path.isdir(aside):
        os.replace(aside, aside + ".discard")
    shutil.rmtree(aside + ".discard", ignore_errors=True)


def settle(out, at_end=False):
    """An --overwrite in progress (OUT/.replaced/) is decided, whatever moment a kill -9 chose:
      - the move was not complete (no COMPLETE mark): the new run has not written anything; the
        files moved so far go back;
      - complete, and OUT/ holds a checkpoint (necessarily the new run's): the old run goes (commit);
      - complete, no checkpoint: the new run's files go, then the mark, then the old files come back
        (a kill during this leaves an unmarked .replaced/, which the next settle finishes moving back).
    At the end of a run that left nothing but its lock, the lock file goes too."""
    aside = os.path.join(out, REPLACED)
    shutil.rmtree(aside + ".discard", ignore_errors=True)          # a commit cut short
    if os.path.isdir(aside):
        complete = os.path.exists(os.path.join(aside, COMPLETE))
        if complete and has_checkpoint(out):
            commit(out)
        else:
            if complete:
                for f in RUN_FILES:                                 # the new run's files
                    if not os.path.exists(os.path.join(aside, f)):
                        with contextlib.suppress(FileNotFoundError):
                            os.remove(os.path.join(out, f))
                os.remove(os.path.join(aside, COMPLETE))
            for f in RUN_FILES:                                     # the old run's, over any of the new's
                with contextlib.suppress(FileNotFoundError):
                    os.replace(os.path.join(aside, f), os.path.join(out, f))
            shutil.rmtree(aside, ignore_errors=True)
            print(f"{out}/: the run that --overwrite was to replace is back in place (the new run "
                  f"{'ended' if at_end else 'was stopped'} before its first checkpoint)")
    if at_end and not any(os.path.exists(os.path.join(out, f)) for f in RUN_FILES):
        with contextlib.suppress(OSError):
            os.remove(os.path.join(out, ".lock"))        # held by us: released just after


def _remove_if_empty(out):
    with contextlib.suppress(OSError):
        os.rmdir(out)


# ------------------------------------------------------------------------------------------ resuming


def resume_target(resume, out, out_given):
    """(checkpoint path, run folder) of --resume [CHECKPOINT|FOLDER] with --out: --resume alone is
    --out's latest.npz (its best.npz if a run was stopped before its first save); a folder is its
    latest.npz; without --out, a run continues in the checkpoint's own folder."""
    if resume is True:
        if os.path.isdir(os.path.join(out, REPLACED)):       # an --overwrite killed half-way: decide it first
            try:
                with folder_lock(out, "a training run"):
                    settle(out)
            except FolderBusy as e:
                raise CheckpointError(f"--out {e}") from None
        if not any(os.path.isfile(os.path.join(out, f)) for f in (LATEST, BEST)):
            raise CheckpointError(f"--resume: no checkpoint in {out}/ to resume from (looked for {LATEST} and "
                                  f"{BEST}); start the run without --resume")
        return resolve(out), out
    path = resolve(resume)
    if not out_given:
        out = resume if os.path.isdir(resume) else (os.path.dirname(path) or ".")
    return path, out


def _same_folder(a, b):
    try:
        return os.path.samefile(a or ".", b or ".")
    except OSError:
        return False


def _folder_run(out, read_meta):
    """(run id or None, step, file name) of the checkpoint in `out` that says which run it holds
    (latest.npz, else best.npz), or None when neither can be read."""
    for name in (LATEST, BEST):
        path = os.path.join(out, name)
        if os.path.exists(path):
            try:
                meta = read_meta(path)
            except CheckpointError:
                continue                                  # damaged: the other one may tell
            return run_id_of(meta), meta.get("step"), name
    return None


def run_id_of(meta):
    """The run id a checkpoint's metadata names, or None (a checkpoint of an older version)."""
    run_id = meta.get("run_id")
    return run_id if isinstance(run_id, str) else None


def check_resume(out, path, meta, read_meta):
    """The run id the resumed run goes on with, or a CheckpointError when resuming the checkpoint at
    `path` (its metadata `meta`) into `out` would write over another run or over a checkpoint of
    the same run that is further ahead. read_meta(path) -> a checkpoint's metadata."""
    own = _same_folder(os.path.dirname(path), out)
    run_id = run_id_of(meta) if own and run_id_of(meta) else new_run_id()       # elsewhere: a branch
    for name in (LATEST, BEST):                            # a file there the run could not save over
        check_replaceable(os.path.join(out, name), "full")
    here = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
    if not here or _same_folder(path, os.path.join(out, LATEST)):
        return run_id
    theirs = _folder_run(out, read_meta)
    mine = run_id_of(meta)
    if theirs is not None and theirs[0] and mine:
        same = theirs[0] == mine
    else:                                                  # no ids (an older version's): its folder tells
        same = own
    if not same:
        raise CheckpointError(f"--resume {path} is of another run than the one in {out}/ ({', '.join(here)}): "
                              f"resuming it there would replace that run's checkpoints and mix the two logs; "
                              f"resume it into its own folder (--out {os.path.dirname(path) or '.'}) or into "
                              f"a new --out")
    if theirs is not None and theirs[2] == LATEST and isinstance(theirs[1], int) and theirs[1] > meta["step"]:
        raise CheckpointError(f"{out}/{LATEST} is at step {theirs[1]:,}, further than {path} (step "
                              f"{meta['step']:,}): resuming from it here would replace {LATEST}; continue from "
                              f"the latest with --resume, or branch off into a new folder with "
                              f"--resume {path} --out NEW_FOLDER")
    return run_id
