"""Which settings a resumed run must share with the checkpoint it resumes, beyond the model itself.

Plain dicts in (`config_to_dict` output, the one in the manifest and the one of the run now), so this
needs no config type. The settings listed decide which data is read in which order or how the optimizer
moves; changed on resume, they silently make a run unlike the one the checkpoint began, so the user is
asked to accept the change (checkpoint.resume_changed) rather than find out from the loss curve.
"""
from __future__ import annotations

import json

# A section name stands for every key in it. train.steps is here because the schedule's horizon depends
# on it (lr_at(step, lr, steps, schedule)): extending a run is common, and accepted with the flag.
RESUME_SETTINGS = ("train.global_batch_size", "train.seed", "train.steps", "data.seq_len", "data.path",
                   "data.tokenizer", "schedule", "optim")


def _flat(config: dict) -> dict[str, object]:
    # Through JSON, so both sides spell values alike (a tuple here, a list in the manifest).
    config = json.loads(json.dumps(config))
    found = {}
    for setting in RESUME_SETTINGS:
        section, _, key = setting.partition(".")
        values = config.get(section, {})
        if key:
            if key in values:
                found[setting] = values[key]
        else:
            found.update({f"{section}.{k}": v for k, v in values.items()})
    return found


def changed_settings(saved: dict, now: dict) -> list[tuple[str, object, object]]:
    """(key, saved value, current value) for each resume setting that differs. A key the saved config
    does not have (a checkpoint from before the setting existed) cannot be compared and is left out."""
    before, after = _flat(saved), _flat(now)
    return [(k, before[k], after.get(k)) for k in sorted(before) if before[k] != after.get(k)]
