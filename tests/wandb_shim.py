"""A stand-in for the `wandb` command, so the README's W&B sweep commands run where no W&B server is.

    wandb sweep FILE         keeps FILE as the sweep SWEEP_ID (in ./wandb/) and prints the id
    wandb agent ID [ARG...]  runs one trial as W&B's agent does: the sweep's `command`, its macros
                             (${env}, ${interpreter}, ${program}, ${args}, ${args_no_hyphens}, ...)
                             expanded for one seeded sample of its parameters, then the ARGs (the
                             README test's overrides); exits with the trial's status

The macros are filled by W&B's own functions, as its agent does (wandb/wandb_agent.py,
Agent._command_run); a macro W&B does not know fails here rather than vanishing.
"""

from __future__ import annotations

import math
import os
import random
import sys
from pathlib import Path
from typing import Any

import yaml

SWEEP_ID = "local/sdtrain/readme01"  # ENTITY/PROJECT/ID


def sweep_file(sweep_id: str) -> Path:
    return Path("wandb") / f"sweep-{sweep_id.rsplit('/', 1)[-1]}" / "sweep.yaml"


def sample(parameters: dict[str, dict], rng: random.Random) -> dict[str, Any]:
    """One value of each parameter, drawn as W&B's random search draws it."""
    out = {}
    for key, p in parameters.items():
        kind = p.get("distribution")
        if "value" in p:
            out[key] = p["value"]
        elif "values" in p:
            out[key] = rng.choice(p["values"])
        elif kind == "log_uniform_values":
            out[key] = math.exp(rng.uniform(math.log(p["min"]), math.log(p["max"])))
        elif kind == "int_uniform" or (kind is None and isinstance(p["min"], int)):
            out[key] = rng.randint(p["min"], p["max"])
        elif kind in (None, "uniform"):
            out[key] = rng.uniform(p["min"], p["max"])
        else:
            sys.exit(f"wandb shim: no sampler for {key}: {p}")
    return out


def trial_command(spec: dict, values: dict[str, Any]) -> list[str]:
    """The sweep's `command` for these parameter values, as W&B's agent expands it."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    macros = create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})
    macros |= {"env": ["/usr/bin/env"], "interpreter": ["python"], "program": [spec["program"]]}
    argv = []
    for chunk in map(str, create_sweep_command(spec.get("command"))):
        if chunk.startswith("${") and chunk.endswith("}"):
            if chunk[2:-1] not in macros:
                sys.exit(f"wandb shim: W&B has no macro {chunk}")
            argv += macros[chunk[2:-1]]
        else:
            argv.append(chunk)
    return argv


def main(argv: list[str]) -> int:
    if argv[:1] == ["sweep"] and len(argv) == 2:
        sweep_file(SWEEP_ID).parent.mkdir(parents=True, exist_ok=True)
        sweep_file(SWEEP_ID).write_text(Path(argv[1]).read_text())
        print(f"wandb: Creating sweep with ID: {SWEEP_ID.rsplit('/', 1)[-1]}")
        print(f"wandb: Run sweep agent with: wandb agent {SWEEP_ID}")
        return 0
    if argv[:1] == ["agent"] and len(argv) >= 2 and not argv[1].startswith("-"):
        spec = yaml.safe_load(sweep_file(argv[1]).read_text())
        command = trial_command(spec, sample(spec["parameters"], random.Random(0)))
        env = dict(os.environ, WANDB_SWEEP_ID=argv[1].rsplit("/", 1)[-1])
        print("wandb: Agent starting run:", " ".join(command + argv[2:]), flush=True)
        os.execvpe(command[0], command + argv[2:], env)
    sys.exit(f"wandb shim: no stand-in for `wandb {' '.join(argv)}`")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
