"""The grokquant CLI killed with SIGKILL (no clean-up runs) right after the N-th call of one function, for
the resume tests: `python -c SCRIPT TARGET N grokquant-args...` with SCRIPT = `script(setup)`.

TARGET is `module:attr` or `module:Class.attr`, e.g. `grokquant.io.layer_work:LayerWork.commit`; N = 0
never kills. `setup` runs first: it may patch module settings and pop its own arguments after TARGET and N.
"""

import importlib
import os
import signal


def kill_after(target: str, nth: int) -> None:
    module, _, path = target.partition(":")
    owner = importlib.import_module(module)
    *parents, name = path.split(".")
    for p in parents:
        owner = getattr(owner, p)
    real, seen = getattr(owner, name), [0]

    def killing(*args, **kw):
        out = real(*args, **kw)
        seen[0] += 1
        if seen[0] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    setattr(owner, name, killing)


def script(setup: str = "") -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    return (f"import sys\nsys.path.insert(0, {here!r})\nimport killed_cli\n"
            "target, nth = sys.argv.pop(1), int(sys.argv.pop(1))\n"
            f"{setup}\nkilled_cli.kill_after(target, nth)\n"
            "from grokquant.cli import main\nmain(prog_name='grokquant')\n")
