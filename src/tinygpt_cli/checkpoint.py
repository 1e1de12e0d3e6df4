"""Checkpoints: `runs/<name>/checkpoints/step_<N>/{model.safetensors, optimizer.pt, state.json}` + `latest`.

A checkpoint is written into a hidden temp folder, every file fsynced, then renamed into place; only
then does the `latest` pointer move (itself temp + fsync + rename). A process killed at any moment
therefore leaves the previous checkpoint loadable. Loading uses safetensors and
`torch.load(weights_only=True)` only: a checkpoint can never run code.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import re
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tinygpt_cli import __version__, workspace
from tinygpt_cli.config import ModelConfig, RunConfig, config_from_dict
from tinygpt_cli.errors import CheckpointError, ConfigError, described, first_line
from tinygpt_cli.workspace import fsync_dir, fsync_file, write_text_atomic

if TYPE_CHECKING:  # torch loads only where tensors are read or written, so listing runs stays instant
    import torch

WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
LATEST_FILE = "latest"
FORMAT = "tinygpt"
TIED_KEY = "lm_head.weight"  # shares storage with transformer.wte.weight; not stored twice
_STEP_DIR = re.compile(r"^step_(\d+)$")
_SET_ASIDE = re.compile(r"^\.old-(step_\d+)-\d+$")  # a step a re-save of it set aside: save_checkpoint


def _new_file_mode() -> int:
    """The mode `open()` gives a new file in this process: 0o666 less the umask."""
    try:  # Linux says it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def save_safetensors(tensors: dict[str, Any], path: Path, metadata: dict[str, str]) -> None:
    """safetensors' `save_file`, the file then given the mode every other file a command writes has: safetensors
    makes its files 0600, unreadable to the group and others an export or a run is shared with. Its I/O errors
    (a full disk) are raised as the OSError they are, which callers turn into one line of advice."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as exc:  # a full disk is "... I/O error: No space left on device (os error 28)"
        code = re.search(r"\(os error (\d+)\)", str(exc))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1)))) from None
    _sort_metadata(path)
    os.chmod(path, _new_file_mode())


def _sort_metadata(path: Path) -> None:
    """Rewrite the header of the safetensors file `path` in place with its metadata in sorted order: safetensors
    writes it in the order of a Rust HashMap, which changes from one save to the next, so that two runs with the same
    weights wrote files that differed (a reproduction checked with sha256 failed). The header keeps its length."""
    with open(path, "r+b") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
        metadata = header.get("__metadata__")
        if not metadata:
            return
        header = {"__metadata__": dict(sorted(metadata.items())),
                  **{key: value for key, value in header.items() if key != "__metadata__"}}
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) > length:  # another writer's spelling of the same header: left as it is
            return
        handle.seek(8)
        handle.write(text.ljust(length))  # safetensors pads its header with spaces too


def remove_leftovers(run_dir: Path) -> None:
    """Remove what saves killed mid-write (SIGKILL, a power cut) left in the run's checkpoints folder: the
    temporary step folders and `latest` files of `save_checkpoint`, which a later run never reads, and the copy of
    a step that a re-save of it set aside: put back where the new copy never arrived, else removed. Only the
    process that holds the run (train's lock) calls this: no save of another is under way."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return
    for child in root.iterdir():
        if child.is_symlink() or not child.is_dir():
            if child.name.startswith(f".{LATEST_FILE}.tmp-"):
                child.unlink(missing_ok=True)
        elif child.name.startswith(".tmp-step_"):
            shutil.rmtree(child, ignore_errors=True)
        elif match := _SET_ASIDE.match(child.name):
            if (root / match.group(1)).exists():
                shutil.rmtree(child, ignore_errors=True)
            else:
                workspace.replace(child, root / match.group(1))


def _torch_save(obj: Any, path: Path) -> None:
    """`torch.save`, with a full disk (or a file size limit) said as the OSError it is: torch's zip writer meets it
    and then says "RuntimeError: [enforce fail at inline_container.cc] unexpected pos …" instead."""
    import torch

    try:
        with open(path, "wb") as handle:
            torch.save(obj, handle)
    except RuntimeError as exc:
        if isinstance(exc.__context__, OSError):
            raise exc.__context__ from None
        raise OSError(errno.EIO, f"writing {path.name} failed: {first_line(exc, 160)}", str(path)) from exc


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    keep_last: int = 3,
    *,
    model_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
    keep: tuple[Path, ...] = (),
) -> Path:
    """Write checkpoint `step` of `model` (the raw module, not a compiled/DDP wrapper) atomically; then prune the
    checkpoints older than the last `keep_last`, except those in `keep` (the best one).

    `model_state` / `optimizer_state` replace `model.state_dict()` / `optimizer.state_dict()` when given
    (FSDP gathers full state dicts first).
    """

    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    tmp = root / f".tmp-step_{step}-{os.getpid()}"
    aside: Path | None = None
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        config: ModelConfig = model.config  # type: ignore[assignment]
        weights = model_state if model_state is not None else model.state_dict()
        tensors = {k: v.detach().contiguous().cpu() for k, v in weights.items() if k != TIED_KEY}
        metadata = {"format": FORMAT, "tinygpt_version": __version__, "model_config": json.dumps(vars(config))}
        save_safetensors(tensors, tmp / WEIGHTS_FILE, metadata)
        fsync_file(tmp / WEIGHTS_FILE)
        if optimizer_state is None and optimizer is not None:
            optimizer_state = optimizer.state_dict()
        if optimizer_state is not None:
            _torch_save(optimizer_state, tmp / OPTIMIZER_FILE)
            fsync_file(tmp / OPTIMIZER_FILE)
        full_state = {"format": FORMAT, "step": step, "model_config": vars(config), **state}
        with open(tmp / STATE_FILE, "w", encoding="utf-8") as handle:
            json.dump(full_state, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        fsync_dir(tmp)
        if final.exists():  # a re-save of the same step (after a resume): the old copy stays whole until replaced
            aside = root / f".old-{final.name}-{os.getpid()}"
            workspace.replace(final, aside)
        workspace.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if aside is not None and not final.exists():
            workspace.replace(aside, final)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    write_text_atomic(root / LATEST_FILE, final.name + "\n")
    prune_checkpoints(root, keep_last, protect=(final, *keep))
    return final


def device_name(device: Any, error: type[Exception]) -> str:
    """`device` (a name or a torch.device) as auto, cpu, cuda, cuda:N or mps, else `error` (torch's own lists two
    dozen kinds). The index in ASCII digits ("٣" is decimal to isdecimal), without leading zeros (torch refuses
    cpu:00)."""
    name = str(device).strip().lower()
    kind, colon, index = name.partition(":")
    if kind not in ("auto", "cpu", "cuda", "mps") or (colon and (kind == "auto" or not (
            index.isascii() and index.isdecimal()))):
        raise error(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    return f"{kind}:{int(index)}" if colon else kind


def device_present(kind: str) -> bool:
    """Whether this machine has a CUDA or MPS device that torch can use (`kind` "cuda", "mps"); other kinds, the
    CPU's among them, are torch's to check."""
    import torch

    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    return True


def step_folders(run_dir: Path) -> list[Path]:
    """A run's `checkpoints/step_<N>` folders, complete or not, oldest first (by step)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(match.group(1)), child) for child in root.iterdir() if (match := _STEP_DIR.match(child.name))]
    return [child for _, child in sorted(found)]


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first (by step)."""
    return [child for child in step_folders(run_dir)
            if (child / STATE_FILE).is_file() and (child / WEIGHTS_FILE).is_file()]


def prune_checkpoints(root: Path, keep_last: int, protect: tuple[Path, ...]) -> None:
    """Remove the checkpoints of `root` older than the last `keep_last` (0: none), but not those in `protect`."""
    if keep_last <= 0:
        return
    checkpoints = list_checkpoints(root.parent)
    for old in checkpoints[: max(0, len(checkpoints) - keep_last)]:
        if old not in protect:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `latest` points to (a step folder of this run: nothing elsewhere), else the highest
    complete step, else None. None too where the step `latest` names was set aside by a re-save of it that was
    killed: it is whole, and the run's next training puts it back (`remove_leftovers`), so an older step is not
    its latest."""
    pointer = run_dir / "checkpoints" / LATEST_FILE
    if pointer.is_file():
        named = pointer.read_text(encoding="utf-8", errors="replace").strip()
        target = run_dir / "checkpoints" / named
        if _STEP_DIR.match(named) and (target / STATE_FILE).is_file() and (target / WEIGHTS_FILE).is_file():
            return target
        if _STEP_DIR.match(named) and not target.exists() and _set_aside(run_dir, named):
            return None
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def _set_aside(run_dir: Path, step: str = "step_*") -> list[Path]:
    """The copies of `step` (any step by default) that re-saves of them set aside and did not finish."""
    root = run_dir / "checkpoints"
    return sorted(p for p in root.glob(f".old-{step}-*") if _SET_ASIDE.match(p.name)) if root.is_dir() else []


def latest_step(run_dir: Path) -> int | None:
    """The step of the run's latest complete checkpoint, or None."""
    checkpoint = latest_checkpoint(run_dir)
    return int(checkpoint.name.split("_")[1]) if checkpoint is not None else None


@dataclass
class RunScan:
    """What runs/ holds (`scan_runs`)."""

    complete: list[Path]  # run folders with a complete checkpoint, the one that trained last first
    incomplete: list[tuple[float, Path]]  # saved checkpoints, none complete now (a file went missing): (when, run)
    unsaved: list[Path]  # run folders that have saved no checkpoint yet: starting now, or killed before the first


def scan_runs(problems: list[str] | None = None) -> RunScan:
    """One pass over runs/. Runs are ordered by when their latest checkpoint was saved (state.json's `saved_at`),
    not by file times, which a copy (`cp -r`, scp, unzip) or freeing disk space in an old run (deleting its
    optimizer.pt) changes; a run that holds no complete checkpoint by when it last trained (its metrics.jsonl's
    time). A link in runs/ to another run there is that run under a second name, and left out. A folder that cannot
    be read, and a link to a folder that is gone, are left out and said in `problems`."""
    root = workspace.runs_dir()
    scan = RunScan([], [], [])
    if not root.is_dir():
        return scan
    complete = []
    for run in root.iterdir():
        if run.name.startswith("."):  # no run name starts with a dot: locks, and a deletion's folder (`runs rm`)
            continue
        try:
            if run.is_symlink() and not run.exists():
                if problems is not None:
                    problems.append(f"{run.name} is left out: it links to {os.readlink(run)}, which is missing (a disk "
                                    f"not mounted, or a folder moved): mount or restore it, or remove the link")
                continue
            if not run.is_dir() or workspace.sibling_target(run) is not None:  # a second name of a run listed
                continue
            checkpoint = latest_checkpoint(run)
            if checkpoint is not None:
                complete.append(((_saved_at(checkpoint), checkpoint.stat().st_mtime_ns), run))
            elif (step_folders(run) or _set_aside(run)) and (run / "metrics.jsonl").is_file():
                scan.incomplete.append(((run / "metrics.jsonl").stat().st_mtime, run))
            elif (run / "config.yaml").is_file():
                scan.unsaved.append(run)
        except OSError as exc:
            if problems is not None:
                problems.append(f"{run.name} is left out: it cannot be read ({exc.strerror}): check its permissions")
    scan.complete = [run for _, run in sorted(complete, key=lambda pair: pair[0], reverse=True)]
    scan.incomplete.sort(key=lambda pair: pair[0], reverse=True)
    scan.unsaved.sort(key=lambda run: run.name)
    return scan


def _saved_at(checkpoint: Path) -> float:
    """When `checkpoint` was saved, as its state.json says; its folder's time where that says nothing usable."""
    with contextlib.suppress(CheckpointError, OSError, KeyError, TypeError, ValueError):
        return _dt.datetime.fromisoformat(read_state(checkpoint)["saved_at"]).timestamp()
    return checkpoint.stat().st_mtime


def _trained_at(run: Path) -> float:
    """When a run last trained: its metrics.jsonl's time, else its latest checkpoint's (0 where it is gone)."""
    with contextlib.suppress(OSError):
        return (run / "metrics.jsonl").stat().st_mtime
    checkpoint = latest_checkpoint(run)
    with contextlib.suppress(OSError):
        return checkpoint.stat().st_mtime if checkpoint is not None else 0.0
    return 0.0


def find_run(spec: str | None) -> Path:
    """A run folder by name or path; None -> the latest run. Raises if there is none."""
    if not spec:
        scan = scan_runs()
        runs, damaged = scan.complete, scan.incomplete
        if damaged and (not runs or damaged[0][0] > _trained_at(runs[0])):
            raise CheckpointError(f"the latest run: {no_checkpoint_message(damaged[0][1])}; or name another run "
                                  f"(`tinygpt runs` lists them)")
        if not runs:
            raise CheckpointError(
                f"no trained run in {workspace.runs_dir()}: train one with `tinygpt train --size micro`"
            )
        return runs[0]
    for candidate in run_candidates(spec):
        if candidate.is_dir():
            return candidate
    close = workspace.close_names(spec, workspace.runs_dir()) if workspace.is_bare_name(spec) else ""
    raise CheckpointError(f"no run or checkpoint at {spec}{close}: list them with `tinygpt runs`")


def run_candidates(spec: str) -> tuple[Path, ...]:
    """Where `spec` may name a run or checkpoint folder, in order: a bare name is the workspace's run before a
    folder here; a relative path is tried from here, then from the workspace (`runs/r/checkpoints/step_N` from any
    folder) and its runs/ (`r/checkpoints/step_N`)."""
    path = Path(spec).expanduser()
    if workspace.is_bare_name(spec):
        return workspace.runs_dir() / spec, path
    return (path,) if path.is_absolute() else (path, workspace.root() / path, workspace.runs_dir() / path)


def resolve_checkpoint(spec: str | None) -> Path:
    """A checkpoint folder from a run name/path, a checkpoint folder, a run's checkpoints/ folder (its latest),
    or None (latest run)."""
    path = find_run(spec)
    if (path / STATE_FILE).is_file() or (path / WEIGHTS_FILE).is_file():
        return path
    path = run_of_checkpoints(path)
    checkpoint = latest_checkpoint(path)
    if checkpoint is None:
        raise CheckpointError(no_checkpoint_message(path))
    return checkpoint


def run_of_checkpoints(path: Path) -> Path:
    """The run a run's `checkpoints/` folder belongs to; any other folder as it is."""
    return path.parent if path.name == "checkpoints" and is_run_folder(path.parent) else path


def record_folder(checkpoint: Path) -> Path:
    """Where the records of `checkpoint` (eval's eval.jsonl and report.md) go: the run folder of
    `runs/<name>/checkpoints/step_<N>`; a checkpoint elsewhere is its own record folder. Absolute, whatever the
    path given: a relative one (`.`, `step_20`) names neither its folder nor its run."""
    checkpoint = Path(os.path.abspath(checkpoint))
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint


def is_run_folder(path: Path) -> bool:
    """Whether `path` looks like a training run: its config.yaml or its checkpoints/ folder."""
    return (path / "config.yaml").is_file() or (path / "checkpoints").is_dir()


def no_checkpoint_message(path: Path) -> str:
    """Why `path` has no checkpoint to use: a run that has not saved one yet, or a folder that is no run."""
    if is_run_folder(path):
        aside = _set_aside(path)
        if aside:  # a re-save killed between setting the step aside and renaming its new copy in
            step = _SET_ASIDE.match(aside[-1].name).group(1)  # type: ignore[union-attr]
            return (f"{path}: its checkpoint {step} was being saved again when its training was killed; "
                    f"`tinygpt train --resume --name {path.name}` puts it back (or rename checkpoints/"
                    f"{aside[-1].name} to {step})")
        steps = step_folders(path)
        if steps:  # saved once, then a file went missing: not a run to train from scratch
            newest = steps[-1]
            lacking = " and ".join(name for name in (WEIGHTS_FILE, STATE_FILE) if not (newest / name).is_file())
            return (f"{path} has no complete checkpoint: checkpoints/{newest.name} lacks {lacking or 'files'}; "
                    f"restore it, or train a new run under another --name")
        if (path / "config.yaml").is_file() and os.path.abspath(path.parent) == os.path.abspath(workspace.runs_dir()):
            return (f"{path} holds no checkpoint yet (stopped before its first): start it again with `tinygpt "
                    f"train --config {path / 'config.yaml'} --name {path.name}`, or delete it with `tinygpt runs rm "
                    f"{path.name}`")
        return f"{path} holds no checkpoint yet: train it with `tinygpt train`"
    if (path / "config.json").is_file():  # an export, or a Hugging Face download
        return (f"{path} is a model folder (config.json), not a run: it has no checkpoints or report; `tinygpt eval "
                f"{path}` measures it and `tinygpt generate --model {path}` samples from it")
    return (f"{path} is not a run, checkpoint or model folder (no checkpoints/, state.json or config.json): "
            f"list runs with `tinygpt runs`")


@dataclass
class LoadedCheckpoint:
    """A model loaded by `load_checkpoint` (or `export.load_model`): where from, the model (eval mode), its
    state.json (step, losses, ...) and the run's config (None for a Hugging Face model)."""

    path: Path  # absolute, whatever the spec: a relative one (`.`, `step_20`) names neither its folder nor its run
    model: torch.nn.Module
    state: dict[str, Any]
    run_config: RunConfig | None

    def __post_init__(self) -> None:
        self.path = Path(os.path.abspath(self.path))


def read_state(checkpoint: Path) -> dict[str, Any]:
    state_path = checkpoint / STATE_FILE
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{checkpoint} has no {STATE_FILE}: it is not a tinygpt checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DamagedCheckpoint(f"{state_path} is corrupted", checkpoint) from None
    if not isinstance(state, dict):  # JSON, but no object: damaged, as a cut file is (the advice falls back a step)
        raise DamagedCheckpoint(f"{state_path} is corrupted (it holds a {type(state).__name__}, not the checkpoint's "
                                f"record)", checkpoint)
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{checkpoint} is not a tinygpt checkpoint (state.json has no tinygpt format tag)")
    return state


def spec_text(spec: str | Path | None) -> str | None:
    """A run or checkpoint given as text or as a Path, as text `find_run` reads: a Path is a path, so a relative
    one of one part (`Path("./m1")` is `m1`, which as text is the run m1) is made absolute."""
    if isinstance(spec, Path) and not spec.is_absolute() and workspace.is_bare_name(str(spec)):
        return os.path.abspath(spec)
    return str(spec) if spec is not None else None


def load_checkpoint(spec: str | Path | None = None, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Load the model (fp32, eval mode) of a checkpoint, a run (its latest checkpoint) or the latest run, onto
    `device` (cpu, cuda, cuda:N, mps, or auto: the best there is)."""
    import torch

    from tinygpt_cli.model import gpt_to_load, load_weights

    device = device_name(device, CheckpointError)
    if device == "auto":
        device = next(kind for kind in ("cuda", "mps", "cpu") if device_present(kind))
    spec = spec_text(spec)
    checkpoint = resolve_checkpoint(spec)
    try:
        state, metadata, tensors = _read_checkpoint(checkpoint)
    except CheckpointError:
        # a run's latest checkpoint, pruned by its training (--keep-last) between finding it and reading it
        newer = resolve_checkpoint(spec)
        if newer == checkpoint:
            raise
        checkpoint = newer
        state, metadata, tensors = _read_checkpoint(checkpoint)
    weights = checkpoint / WEIGHTS_FILE
    model_config = _model_config(metadata, weights)
    model = gpt_to_load(model_config)
    expected = {k: v.shape for k, v in model.state_dict().items() if k != TIED_KEY}
    got = {k: v.shape for k, v in tensors.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))[:3]
        raise CheckpointError(
            f"{weights} does not match its model config (missing or misshapen: {', '.join(missing) or 'shapes'})"
        )
    load_weights(model, tensors)  # lm_head.weight is tied to wte
    kind = torch.device(device).type
    if not device_present(kind):
        raise CheckpointError(f"cannot move the model to {device}: this machine has no {kind.upper()} device; load "
                              f"it on one it has, such as cpu")
    model.to(device).eval()
    run_config = None
    if isinstance(state.get("run_config"), dict):
        try:
            run_config = config_from_dict(state["run_config"], origin=str(checkpoint / STATE_FILE))
        except ConfigError:
            run_config = None
    return LoadedCheckpoint(checkpoint, model, state, run_config)


def _read_checkpoint(checkpoint: Path) -> tuple[dict[str, Any], dict[str, str], dict[str, torch.Tensor]]:
    """A checkpoint's state.json, its weights' metadata and its tensors."""
    state = read_state(checkpoint)
    with _weights_of(checkpoint) as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise CheckpointError(f"{checkpoint / WEIGHTS_FILE} is not a tinygpt model (no tinygpt format tag)")
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    return state, metadata, tensors


def _model_config(metadata: dict[str, str], weights: Path) -> ModelConfig:
    """The ModelConfig a weights file's header records. Keys this version does not know are a newer tinygpt's
    (upgrade); a header that does not parse is damage (DamagedCheckpoint: an earlier checkpoint may serve)."""
    try:
        fields = json.loads(metadata["model_config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DamagedCheckpoint(f"{weights} carries no valid model config ({described(exc)})",
                                weights.parent) from None
    unknown = sorted(set(fields) - set(ModelConfig.__dataclass_fields__)) if isinstance(fields, dict) else []
    written_by = metadata.get("tinygpt_version")
    if unknown and written_by and version_key(written_by) > version_key(__version__):
        raise CheckpointError(f"{weights} was written by tinygpt {written_by}, with model settings this version "
                              f"({__version__}) does not have ({', '.join(unknown)}): upgrade tinygpt "
                              f"(pip install -U tinygpt)")
    try:
        return ModelConfig(**fields)
    except (TypeError, ValueError, ConfigError) as exc:
        raise DamagedCheckpoint(f"{weights} carries no valid model config ({described(exc)})",
                                weights.parent) from None


def version_key(version: str) -> tuple[int, ...]:
    """A version's leading numbers, to compare (`2.0.0` > `0.1.0`; `2.6.0+cu124` is (2, 6, 0))."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


@contextlib.contextmanager
def _weights_of(checkpoint: Path) -> Iterator[Any]:
    """The checkpoint's weights file opened with safetensors (its header read, no tensor yet); a missing or
    unreadable file is a CheckpointError that says so."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    weights = checkpoint / WEIGHTS_FILE
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as handle:
            yield handle
    except FileNotFoundError:
        if weights.is_file():  # safetensors says "No such file" of a file it may not open
            raise CheckpointError(f"{weights} cannot be read: check its permissions") from None
        raise CheckpointError(f"{checkpoint} has no {WEIGHTS_FILE}: the checkpoint is incomplete") from None
    except PermissionError:
        raise CheckpointError(f"{weights} cannot be read: check its permissions") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise DamagedCheckpoint(f"{weights} is corrupted ({exc})", checkpoint) from None


def checkpoint_model_config(spec: str | Path | None) -> ModelConfig:
    """The model config of a checkpoint (or a run's latest, as `load_checkpoint` resolves `spec`), read from its
    weights file's header without loading the weights."""
    checkpoint = resolve_checkpoint(spec_text(spec))
    with _weights_of(checkpoint) as handle:
        metadata = handle.metadata() or {}
    return _model_config(metadata, checkpoint / WEIGHTS_FILE)


class DamagedCheckpoint(CheckpointError):
    """A checkpoint file that cannot be read: `what` is wrong with it; the message adds what to do."""

    def __init__(self, what: str, checkpoint: Path) -> None:
        self.what, self.checkpoint = what, checkpoint
        super().__init__(f"{what}: {self.advice()}")

    def _earlier(self) -> Path | None:
        run = self.checkpoint.parent.parent
        found = list_checkpoints(run) if self.checkpoint.parent.name == "checkpoints" else []
        earlier = found[: found.index(self.checkpoint)] if self.checkpoint in found else []  # by step, oldest first
        return earlier[-1] if earlier else None

    def advice(self) -> str:
        """For commands that take a checkpoint: the run's previous one, by path, or by removing this one."""
        earlier = self._earlier()
        if earlier is None:
            return "it has no earlier checkpoint to fall back to: train the run again"
        if latest_checkpoint(self.checkpoint.parent.parent) != self.checkpoint:
            return f"pass an earlier checkpoint ({earlier})"
        return (f"pass an earlier checkpoint ({earlier}), or delete {self.checkpoint} and the run (and --resume) "
                f"falls back to it")

    def resume_advice(self) -> str:
        """For `train --resume`, which always continues from the latest checkpoint and takes no other."""
        earlier = self._earlier()
        if earlier is None:
            return (f"it has no earlier checkpoint to fall back to: train the run again under another --name "
                    f"(or delete {self.checkpoint.parent.parent})")
        return f"delete {self.checkpoint} and --resume falls back to {earlier.name}"


def load_optimizer_state(checkpoint: Path) -> dict[str, Any]:
    import torch

    path = checkpoint / OPTIMIZER_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        run = record_folder(checkpoint)  # where the checkpoint is a run's, --init-from takes the run's name
        source = run.name if run.parent == workspace.runs_dir() else str(checkpoint)
        raise CheckpointError(f"{checkpoint} has no {OPTIMIZER_FILE}: it cannot be resumed exactly; start a new run "
                              f"from its weights with `tinygpt train --init-from {source} --name NEW`") from None
    except Exception as exc:  # torch raises many kinds for a damaged zip
        raise DamagedCheckpoint(f"{path} is corrupted ({type(exc).__name__})", checkpoint) from None
