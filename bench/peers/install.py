"""Install the peers into the cache directory, never system-wide, and say plainly why not.

- codex: the npm package @openai/codex (it carries the native binary for this platform) into
  <cache>/codex with `npm install --prefix`.
- aider: the PyPI package aider-chat into a virtualenv at <cache>/aider-venv.

An install that fails raises `Unavailable` with the reason; the harness reports it and goes on.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path


class Unavailable(Exception):
    """A peer that cannot be installed or started here; the message says why."""


def _tail(text, lines=6):
    return "\n".join(text.strip().splitlines()[-lines:])


def _version_of(cmd, env=None):
    try:
        out = subprocess.run(cmd + ["--version"], capture_output=True, text=True, timeout=120, env=env)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, str(e)
    if out.returncode != 0:
        return None, _tail(out.stderr or out.stdout)
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "", None


def codex_native(exe: Path):
    """The native binary the npm launcher (a Node script) execs, and the environment the
    launcher gives it; None when the layout is not the one known here."""
    root = exe.parent.parent / "@openai" / "codex"
    found = sorted(exe.parent.parent.glob("@openai/codex-*/vendor/*/bin/codex"))
    if not found or not root.exists():
        return None
    return found[0], {"CODEX_MANAGED_BY_NPM": "1", "CODEX_MANAGED_PACKAGE_ROOT": str(root.resolve())}


def codex(cache: Path, version: str, log) -> tuple[Path, str]:
    """Path of the `codex` command (the npm launcher users run) and its version."""
    prefix = cache / "codex"
    exe = prefix / "node_modules" / ".bin" / "codex"
    have, _ = _version_of([str(exe)]) if exe.exists() else (None, None)
    if have and (version == "latest" or have.endswith(" " + version)):
        return exe, have
    if shutil.which("npm") is None:
        raise Unavailable("npm is not installed (codex comes from the npm package @openai/codex)")
    log(f"installing @openai/codex@{version} into {prefix} (npm) ...")
    prefix.mkdir(parents=True, exist_ok=True)
    cmd = ["npm", "install", "--prefix", str(prefix), "--no-audit", "--no-fund", "--no-save",
           "--loglevel=error", f"@openai/codex@{version}"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        raise Unavailable("npm install @openai/codex timed out after 15 minutes")
    if out.returncode != 0:
        raise Unavailable(f"npm install @openai/codex@{version} failed: {_tail(out.stderr)}")
    have, why = _version_of([str(exe)])
    if not have:
        raise Unavailable(f"codex was installed but does not start: {why}")
    return exe, have


def _python_for_aider():
    """aider-chat 0.86 supports CPython 3.10 to 3.12."""
    candidates = [sys.executable, "python3.12", "python3.11", "python3.10", "python3"]
    for c in candidates:
        path = shutil.which(c) if os.sep not in c else c
        if not path:
            continue
        out = subprocess.run([path, "-c", "import sys; print(sys.version_info[:2] >= (3, 10) and sys.version_info[:2] < (3, 13))"],
                             capture_output=True, text=True)
        if out.stdout.strip() == "True":
            return path
    return None


def aider(cache: Path, version: str, log) -> tuple[Path, str]:
    """Path of the `aider` command in its virtualenv and its version."""
    venv = cache / "aider-venv"
    exe = venv / "bin" / "aider"
    have, _ = _version_of([str(exe)]) if exe.exists() else (None, None)
    if have and (version == "latest" or have.endswith(" " + version)):
        return exe, have
    python = _python_for_aider()
    if python is None:
        raise Unavailable("no CPython 3.10-3.12 found (aider-chat needs one)")
    spec = "aider-chat" if version == "latest" else f"aider-chat=={version}"
    log(f"installing {spec} into {venv} (pip, a few minutes the first time) ...")
    if not (venv / "bin" / "python").exists():
        out = subprocess.run([python, "-m", "venv", str(venv)], capture_output=True, text=True)
        if out.returncode != 0:
            raise Unavailable(f"creating the virtualenv failed: {_tail(out.stderr)}")
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", spec]
    try:
        out = subprocess.run(pip, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        raise Unavailable(f"pip install {spec} timed out after 30 minutes")
    if out.returncode != 0:
        raise Unavailable(f"pip install {spec} failed: {_tail(out.stderr)}")
    have, why = _version_of([str(exe)])
    if not have:
        raise Unavailable(f"aider was installed but does not start: {why}")
    return exe, have
