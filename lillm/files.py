"""Small file helpers shared by every component: JSON read with a clear error, atomic write, sampled hash."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lillm.errors import UserError


def read_json(path: str | os.PathLike, missing: str) -> Any:
    """Parse a JSON file; a missing file raises UserError(`missing`), bad JSON names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(missing)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file") from None


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a file so that readers see the old content or the new, never a partial one, and so that it is on
    the disk when this returns: the content is fsynced before the rename, the directory after it (without the
    second, a power loss can undo the rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a full disk, a read-only place: the old content stays, the error names the file
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    fsync_dir(path.parent)


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike) -> Iterator[Path]:
    """A directory of output written whole or not at all: the caller writes into a temporary folder beside
    `out`; on success its files are synced and moved into place (the folder renamed to `out`, or its files
    moved over those of an existing `out`), and on any failure the folder is removed, so a full disk or an
    interrupt leaves no half-written output. An OSError becomes one line naming `out`."""
    out = Path(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        yield tmp
        fsync_tree(tmp)
        if not out.exists():
            os.replace(tmp, out)
        else:
            for f in sorted(tmp.iterdir()):
                os.replace(f, out / f.name)
            tmp.rmdir()
        fsync_dir(out.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{out}: {e.strerror or e} (nothing written)") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file's data and metadata to the disk. Any descriptor of the file does: the kernel writes back
    the inode's dirty pages whoever wrote them, so a file another library wrote and closed is synced here."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (files created, renamed or removed in it) to the disk. Filesystems that
    cannot sync a directory (some network mounts) refuse with EINVAL/ENOTSUP; their entries are durable by
    their own protocol, so that is not an error."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file under `root`, then every directory, deepest first (see `fsync_file`, `fsync_dir`)."""
    dirs = []
    for here, _, files in os.walk(root):
        dirs.append(here)
        for name in files:
            fsync_file(os.path.join(here, name))
    for here in reversed(dirs):
        fsync_dir(here)


def save_safetensors(tensors: dict[str, Any], path: str | os.PathLike) -> None:
    """safetensors' `save_file`, the file then given the mode of any file the user writes (0666 less the
    umask): safetensors makes its files 0600, so others on a shared machine could not read an export."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, path, metadata={"format": "pt"})
    except SafetensorError as e:  # its I/O errors, e.g. "... (os error 28)": an OSError naming the file
        m = re.search(r"os error (\d+)", str(e))
        code = int(m.group(1)) if m else errno.EIO
        raise OSError(code, os.strerror(code) if m else str(e), str(path)) from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2) + "\n")


def strict_yaml_load(text: str) -> Any:
    """jsonargparse's YAML loader, refusing a mapping that names a key twice: PyYAML keeps the last value
    silently, so a config with `lr` written twice would train with whichever came last."""
    import yaml
    from jsonargparse._loaders_dumpers import get_yaml_default_loader, yaml_load

    if isinstance(text, str) and ":" in text:  # only a mapping can repeat a key
        _refuse_duplicate_keys(yaml.compose(text, Loader=get_yaml_default_loader()))
    return yaml_load(text)


def _refuse_duplicate_keys(node: Any) -> None:
    import yaml

    stack = [node] if node is not None else []
    while stack:
        n = stack.pop()
        if isinstance(n, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key, value in n.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else None
                if name is not None and name in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {name!r} at line {key.start_mark.line + 1} (first at line "
                        f"{seen[name]}): remove one of them", None)
                if name is not None:
                    seen[name] = key.start_mark.line + 1
                stack.append(value)
        elif isinstance(n, yaml.SequenceNode):
            stack.extend(n.value)


def use_strict_yaml() -> None:
    """Make jsonargparse read every YAML value and `--config` file with `strict_yaml_load`."""
    import yaml
    from jsonargparse import set_loader

    set_loader("yaml", strict_yaml_load, exceptions=(yaml.YAMLError,))


def sampled_sha256(path: str | os.PathLike, samples: int, block: int) -> str:
    """sha256 of a file's size and `samples` blocks of `block` bytes at evenly spaced offsets (the first at 0,
    the last ending at the end of the file): a fixed, small read whatever the size. Same-size damage to a whole
    file (a copy gone wrong, a file overwritten or shuffled) shows; a few bytes changed between samples do not."""
    size = os.path.getsize(path)
    h = hashlib.sha256(size.to_bytes(8, "little"))
    with open(path, "rb") as fh:
        for i in range(samples):
            fh.seek(max(0, size - block) * i // max(1, samples - 1))
            h.update(fh.read(block))
    return h.hexdigest()
