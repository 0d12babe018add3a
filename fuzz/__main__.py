"""``python -m fuzz [--seconds N] [TARGET...]``: replay the corpus, then fuzz each target."""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fuzz.mutate import fuzz_loop
from fuzz.targets import TARGETS

ROOT = Path(__file__).resolve().parent
CORPUS = ROOT / "corpus"
CRASHES = ROOT / "crashes"


def corpus_of(target: str) -> list[bytes]:
    folder = CORPUS / target
    return [p.read_bytes() for p in sorted(folder.iterdir())] if folder.is_dir() else []


def replay(target: str) -> int:
    inputs = corpus_of(target)
    for data in inputs:
        TARGETS[target](data)
    return len(inputs)


#: Seconds a coverage-guided session may run past its -max_total_time before it counts as hung.
SESSION_GRACE = 120


def session_command(target: str, seconds: int, artifact_prefix: str, work: Path) -> list[str]:
    """The libFuzzer command line of one coverage-guided session (the suite and ``./dev fuzz`` share it)."""
    # libFuzzer's -timeout is a periodic SIGALRM (every timeout/2 + 1 s); one landing while the
    # interpreter shuts down, after atheris's handler is gone, kills the process (-14). This timeout
    # puts the first alarm after the session ends; a hanging input is caught by SESSION_GRACE instead.
    return [sys.executable, "-m", "fuzz.libfuzzer", target, f"-max_total_time={seconds}",
            f"-timeout={2 * seconds + 20}", "-rss_limit_mb=4096", "-print_final_stats=1",
            f"-artifact_prefix={artifact_prefix}", str(work), str(CORPUS / target)]


def run_session(target: str, seconds: int, artifact_prefix: str, work: Path,
                **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run one session from the repository root.

    Raises:
        subprocess.TimeoutExpired: it ran SESSION_GRACE seconds past its time (an input hangs).
    """
    return subprocess.run(session_command(target, seconds, artifact_prefix, work), cwd=ROOT.parent,
                          env={**os.environ, "PYTHONPATH": str(ROOT.parent)}, timeout=seconds + SESSION_GRACE,
                          text=True, **kwargs)  # type: ignore[call-overload]


def fuzz_atheris(target: str, seconds: int) -> int:
    CRASHES.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        try:
            return run_session(target, seconds, f"{CRASHES}/{target}-", Path(work)).returncode
        except subprocess.TimeoutExpired:
            print(f"{target}: FINDING the session ran {SESSION_GRACE} s past its time: an input hangs")
            return 1


def fuzz_builtin(target: str, seconds: int) -> int:
    try:
        runs = fuzz_loop(TARGETS[target], corpus_of(target), time.monotonic() + seconds, seed=int(time.time()),
                         clock=time.monotonic)
    except Exception as e:
        CRASHES.mkdir(exist_ok=True)
        path = CRASHES / f"{target}-{int(time.time())}"
        path.write_bytes(getattr(e, "fuzz_input", b""))
        print(f"{target}: FINDING {type(e).__name__}: {e} (input saved to {path})")
        return 1
    print(f"{target}: {runs} runs, no findings")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("targets", nargs="*", choices=[*TARGETS, []], default=list(TARGETS), metavar="TARGET")
    parser.add_argument("--seconds", type=int, default=300, help="fuzzing time per target")
    parser.add_argument("--builtin", action="store_true", help="use the built-in mutator even if atheris is present")
    args = parser.parse_args()
    use_atheris = importlib.util.find_spec("atheris") is not None and not args.builtin
    failed = 0
    for target in args.targets or list(TARGETS):
        print(f"{target}: replayed {replay(target)} corpus inputs")
        code = fuzz_atheris(target, args.seconds) if use_atheris else fuzz_builtin(target, args.seconds)
        failed += code != 0
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
