"""SLURM helpers: batch scripts, submission, cancellation and job state. No Dagster import.

Everything that reaches a batch script is either validated against a strict allow-pattern
(``#SBATCH`` directive values, which sbatch parses itself) or shell-quoted with ``shlex.quote``
(the command, working directory and environment). A tag value such as ``gpu:1; touch /tmp/x`` is
rejected with :class:`SlurmOptionError` before anything is written or submitted.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Mapping, Sequence

TAG_PREFIX = "slurm/"

# One strict allow-pattern per option. Values are never interpolated into shell code: directives
# are `#SBATCH --name=value` lines, which sbatch parses (no shell), and they are validated here.
OPTION_PATTERNS: dict[str, re.Pattern[str]] = {
    "partition": re.compile(r"^[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*$"),
    "time": re.compile(r"^([0-9:-]+|UNLIMITED|INFINITE)$"),
    "gres": re.compile(r"^[A-Za-z0-9_:.,-]+$"),
    "mem": re.compile(r"^[0-9]+[KMGT]?B?$", re.IGNORECASE),
    "cpus": re.compile(r"^[1-9][0-9]{0,4}$"),
    "account": re.compile(r"^[A-Za-z0-9_.-]+$"),
    "qos": re.compile(r"^[A-Za-z0-9_.-]+$"),
    "constraint": re.compile(r"^[A-Za-z0-9_.,&|\[\]*()-]+$"),
    "job_name": re.compile(r"^[A-Za-z0-9_.:-]{1,128}$"),
    "nodelist": re.compile(r"^[A-Za-z0-9_.,\[\]-]+$"),
}
# option name -> sbatch long option
SBATCH_FLAGS = {
    "partition": "--partition",
    "time": "--time",
    "gres": "--gres",
    "mem": "--mem",
    "cpus": "--cpus-per-task",
    "account": "--account",
    "qos": "--qos",
    "constraint": "--constraint",
    "job_name": "--job-name",
    "nodelist": "--nodelist",
}
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_EXTRA_ARG = re.compile(r"^--?[A-Za-z][A-Za-z0-9-]*(=[A-Za-z0-9_:.,/@%+=-]*)?$")
_PATH_SAFE = re.compile(r"^[^\n\r\0]+$")


class SlurmError(RuntimeError):
    """A SLURM command failed (the message carries SLURM's own words)."""


class SlurmOptionError(SlurmError, ValueError):
    """A SLURM option (from config or an asset tag) failed validation."""


class SlurmSubmitError(SlurmError):
    """sbatch rejected the job (e.g. 'Requested node configuration is not available')."""


def validate_option(name: str, value: object, *, source: str | None = None) -> str:
    """Return ``value`` as a string if it matches the allow-pattern of ``name``; raise otherwise."""
    if name not in OPTION_PATTERNS:
        raise SlurmOptionError(f"unknown SLURM option {name!r} (known: {sorted(OPTION_PATTERNS)})")
    text = str(value).strip()
    if not OPTION_PATTERNS[name].fullmatch(text):
        where = f" from {source}" if source else ""
        raise SlurmOptionError(
            f"invalid value for SLURM option {name!r}{where}: {text!r} "
            f"(must match {OPTION_PATTERNS[name].pattern})"
        )
    return text


def validate_extra_arg(arg: str) -> str:
    if not _EXTRA_ARG.fullmatch(arg):
        raise SlurmOptionError(f"invalid extra sbatch argument {arg!r} (expected --flag or --flag=value)")
    return arg


@dataclass(frozen=True)
class SlurmOptions:
    """The SLURM request for one job. ``None`` means: leave it to the cluster default."""

    partition: str | None = None
    time: str | None = None
    gres: str | None = None
    mem: str | None = None
    cpus: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    job_name: str | None = None
    nodelist: str | None = None
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name == "extra_args":
                object.__setattr__(self, "extra_args", tuple(validate_extra_arg(a) for a in self.extra_args))
                continue
            value = getattr(self, f.name)
            if value is not None and str(value).strip().lower() not in ("", "none"):
                object.__setattr__(self, f.name, validate_option(f.name, value))
            else:
                object.__setattr__(self, f.name, None)

    def overlay(self, overrides: Mapping[str, object | None], *, source: str | None = None) -> "SlurmOptions":
        """A copy with ``overrides`` (option name -> value) applied; a value of 'none' clears the default."""
        changes: dict[str, object | None] = {}
        for name, value in overrides.items():
            if name not in SBATCH_FLAGS:
                raise SlurmOptionError(f"unknown SLURM option {name!r}{' from ' + source if source else ''}")
            if value is None:
                continue
            text = str(value).strip()
            changes[name] = None if text.lower() in ("", "none") else validate_option(name, text, source=source)
        return replace(self, **changes)

    def directives(self) -> list[str]:
        out = []
        for name, flag in SBATCH_FLAGS.items():
            value = getattr(self, name)
            if value is not None:
                out.append(f"{flag}={value}")
        return out


# Dagster 1.13 asset tag values may only contain [A-Za-z0-9_.-] (<= 63 chars), so ``gpu:1`` or
# ``04:00:00`` cannot be written as asset tags. In tag values, '.' therefore stands for ':' in the
# options whose SLURM syntax uses ':' (gres, time): ``slurm/gres: gpu.1``, ``slurm/time: 04.00.00``.
# Run tags (free-form) may use either spelling. ``slurm/gpus: "2"`` is shorthand for gres gpu:2.
TAG_SAFE_COLON = frozenset({"gres", "time"})
BOOKKEEPING_TAGS = frozenset({"job_id", "script", "log"})


def decode_tag_value(name: str, value: str) -> str:
    text = str(value).strip()
    return text.replace(".", ":") if name in TAG_SAFE_COLON else text


def options_from_tags(tags: Mapping[str, str] | None, *, prefix: str = TAG_PREFIX) -> dict[str, str]:
    """``{"slurm/gres": "gpu.1", "slurm/time": "04.00.00"}`` -> ``{"gres": "gpu:1", "time": "04:00:00"}``.

    Every value is validated against the option's allow-pattern (a value such as
    ``gpu:1; touch /tmp/x`` raises :class:`SlurmOptionError`); unknown ``slurm/*`` keys are rejected
    (except the launcher's own bookkeeping tags such as ``slurm/job_id``)."""
    out: dict[str, str] = {}
    gpus_gres = None
    for key, value in (tags or {}).items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name in BOOKKEEPING_TAGS:
            continue
        if name == "gpus":
            if not re.fullmatch(r"[0-9]{1,3}", str(value).strip()):
                raise SlurmOptionError(f"invalid value for tag {key!r}: {value!r} (expected a GPU count)")
            n = int(str(value).strip())
            gpus_gres = f"gpu:{n}" if n > 0 else "none"
            continue
        if name not in SBATCH_FLAGS:
            known = sorted([prefix + k for k in SBATCH_FLAGS] + [prefix + "gpus"])
            raise SlurmOptionError(f"unknown SLURM tag {key!r} (known: {known})")
        decoded = decode_tag_value(name, value)
        if name == "gres" and decoded.lower() == "none":
            out[name] = "none"
            continue
        out[name] = validate_option(name, decoded, source=f"tag {key!r}")
    if gpus_gres is not None:
        out.setdefault("gres", gpus_gres)  # an explicit slurm/gres wins over slurm/gpus
    return out


def slurm_minutes(value: str) -> int:
    """SLURM's time formats (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) -> whole minutes (rounded up)."""
    days, _, rest = value.rpartition("-") if "-" in value else ("0", "", value)
    parts = [int(p) for p in rest.split(":")]
    if "-" in value:
        h, m, sec = (parts + [0, 0])[:3]
    elif len(parts) == 3:
        h, m, sec = parts
    else:
        h, (m, sec) = 0, (parts + [0])[:2]
    total_s = ((int(days) * 24 + h) * 60 + m) * 60 + sec
    return -(-total_s // 60)


def _format_minutes(minutes: int) -> str:
    d, rem = divmod(minutes, 24 * 60)
    h, m = divmod(rem, 60)
    return f"{d}-{h:02d}:{m:02d}:00" if d else f"{h:02d}:{m:02d}:00"


def merge_tag_options(tag_sets: Sequence[Mapping[str, str]]) -> dict[str, str]:
    """Merge the SLURM tags of several assets in one run. Equal values merge; `time` adds up (one job runs
    the assets one after another: generation 4 h + training 8 h asks for 12 h); any other conflicting
    option raises (one job serves the whole run, so the request must be unambiguous)."""
    merged: dict[str, str] = {}
    for tags in tag_sets:
        for name, value in options_from_tags(tags).items():
            if name == "time" and name in merged:
                merged[name] = _format_minutes(slurm_minutes(merged[name]) + slurm_minutes(value))
                continue
            if name in merged and merged[name] != value:
                raise SlurmOptionError(
                    f"assets in one run ask for different values of slurm/{name}: {merged[name]!r} vs {value!r}; "
                    "launch them in separate runs"
                )
            merged[name] = value
    return merged


def build_batch_script(
    command: Sequence[str],
    options: SlurmOptions,
    *,
    working_directory: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    output: str | os.PathLike[str] | None = None,
    shell: str = "/bin/bash",
) -> str:
    """The text of an sbatch script that runs ``command`` (argv) with ``exec``.

    Directive values are validated (see :class:`SlurmOptions`); the working directory, environment
    values and every argv element are ``shlex.quote``-d, so nothing in them is ever interpreted.
    """
    if not command:
        raise ValueError("empty command")
    lines = [f"#!{shell}"]
    for d in options.directives():
        lines.append(f"#SBATCH {d}")
    if output is not None:
        out = str(output)
        # sbatch reads this line itself (no shell); it must be one line without spaces.
        if not _PATH_SAFE.fullmatch(out) or any(c.isspace() for c in out):
            raise SlurmOptionError(f"invalid SLURM output path {out!r}")
        lines.append(f"#SBATCH --output={out}")
    lines.append("set -e")
    for key, value in (env or {}).items():
        if not _ENV_NAME.fullmatch(key):
            raise SlurmOptionError(f"invalid environment variable name {key!r}")
        lines.append(f"export {key}={shlex.quote(str(value))}")
    if working_directory is not None:
        lines.append(f"cd {shlex.quote(str(working_directory))}")
    lines.append('echo "cb-slurm: job ${SLURM_JOB_ID:-?} on $(hostname) started $(date -Is)" >&2')
    lines.append("exec " + " ".join(shlex.quote(str(a)) for a in command))
    return "\n".join(lines) + "\n"


def _run(args: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    full_env = None
    if env:
        full_env = dict(os.environ)
        full_env.update(env)
    try:
        return subprocess.run(list(args), capture_output=True, text=True, env=full_env, timeout=timeout)
    except FileNotFoundError as e:
        raise SlurmError(f"{args[0]} not found: is the SLURM client installed and on PATH?") from e
    except subprocess.TimeoutExpired as e:
        raise SlurmError(f"{' '.join(args[:2])} timed out after {timeout}s") from e


def submit(
    script_path: str | os.PathLike[str],
    *,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    sbatch: str = "sbatch",
) -> str:
    """``sbatch --parsable SCRIPT``; return the job id. Raise :class:`SlurmSubmitError` with sbatch's message."""
    args = [sbatch, "--parsable", *[validate_extra_arg(a) for a in extra_args], str(script_path)]
    proc = _run(args, env=env)
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip() or f"sbatch exited with {proc.returncode}"
        raise SlurmSubmitError(msg)
    job_id = proc.stdout.strip().splitlines()[-1].split(";")[0].strip() if proc.stdout.strip() else ""
    if not job_id.isdigit():
        raise SlurmSubmitError(f"unexpected sbatch output: {proc.stdout!r} {proc.stderr!r}")
    return job_id


def cancel(job_id: str, *, env: Mapping[str, str] | None = None, signal: str | None = None) -> bool:
    """``scancel JOB``; True when SLURM accepted it, False when the job was already gone."""
    job_id = _check_job_id(job_id)
    args = ["scancel"]
    if signal:
        if not re.fullmatch(r"[A-Z0-9]+", signal):
            raise SlurmOptionError(f"invalid signal {signal!r}")
        args += ["--signal", signal]
    proc = _run([*args, job_id], env=env)
    if proc.returncode != 0:
        err = (proc.stderr or "").lower()
        if "invalid job id" in err or "already completing or completed" in err:
            return False
        raise SlurmError(f"scancel {job_id} failed: {(proc.stderr or proc.stdout).strip()}")
    return "already" not in (proc.stderr or "").lower()


# --- job state -----------------------------------------------------------------------------------

RUNNING_STATES = {"RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT",
                  "RESIZING", "UPDATE_DB", "POWER_UP_NODE"}
PENDING_STATES = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"}
SUCCESS_STATES = {"COMPLETED"}
FAILED_STATES = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
                 "DEADLINE", "REVOKED", "SPECIAL_EXIT", "LAUNCH_FAILED"}


def map_state(raw: str | None) -> str:
    """A SLURM job state -> running | pending | success | failed | unknown."""
    if not raw:
        return "unknown"
    state = raw.strip().split()[0].rstrip("+").upper()  # "CANCELLED by 0", "CANCELLED+"
    if state in RUNNING_STATES:
        return "running"
    if state in PENDING_STATES:
        return "pending"
    if state in SUCCESS_STATES:
        return "success"
    if state in FAILED_STATES:
        return "failed"
    return "unknown"


@dataclass(frozen=True)
class JobState:
    job_id: str
    raw: str | None          # SLURM's state word, e.g. RUNNING, CANCELLED; None when not found
    status: str              # running | pending | success | failed | unknown | not_found
    source: str              # squeue | scontrol | sacct | jobcomp | none | error
    reason: str | None = None
    exit_code: str | None = None
    message: str | None = None  # error text when status is unknown because a command failed

    @property
    def finished(self) -> bool:
        return self.status in ("success", "failed")


def _check_job_id(job_id: str) -> str:
    job_id = str(job_id).strip()
    if not re.fullmatch(r"[0-9]+(_[0-9]+)?", job_id):
        raise SlurmOptionError(f"invalid SLURM job id {job_id!r}")
    return job_id


def _invalid_job(proc: subprocess.CompletedProcess) -> bool:
    return "invalid job id" in ((proc.stderr or "") + (proc.stdout or "")).lower()


def _parse_kv(text: str) -> dict[str, str]:
    out = {}
    for token in text.split():
        if "=" in token:
            k, v = token.split("=", 1)
            out.setdefault(k, v)
    return out


def read_jobcomp(path: str | os.PathLike[str], job_id: str) -> dict[str, str] | None:
    """The last record of ``job_id`` in a ``jobcomp/filetxt`` file (``JobId=.. JobState=..`` lines)."""
    p = Path(path)
    if not p.is_file():
        return None
    found = None
    with p.open(errors="replace") as fh:
        for line in fh:
            if line.startswith(f"JobId={job_id} "):
                found = _parse_kv(line)
    return found


def job_state(
    job_id: str,
    *,
    env: Mapping[str, str] | None = None,
    jobcomp_path: str | os.PathLike[str] | None = None,
) -> JobState:
    """The state of one job: ``squeue`` -> ``scontrol show job`` -> ``sacct -c`` (the jobcomp record)
    -> the jobcomp file itself. When the controller cannot be reached, status is ``unknown`` and
    ``source`` is ``error`` (callers should treat that as transient, not as a lost job)."""
    job_id = _check_job_id(job_id)
    errors = []

    proc = _run(["squeue", "-h", "-j", job_id, "-o", "%T|%r"], env=env)
    if proc.returncode == 0 and proc.stdout.strip():
        raw, _, reason = proc.stdout.strip().splitlines()[0].partition("|")
        return JobState(job_id, raw, map_state(raw), "squeue", reason=reason or None)
    if proc.returncode != 0 and not _invalid_job(proc):
        errors.append(f"squeue: {(proc.stderr or proc.stdout).strip()}")

    proc = _run(["scontrol", "-o", "show", "job", job_id], env=env)
    if proc.returncode == 0 and "JobState=" in proc.stdout:
        kv = _parse_kv(proc.stdout)
        raw = kv.get("JobState")
        return JobState(job_id, raw, map_state(raw), "scontrol", reason=kv.get("Reason"), exit_code=kv.get("ExitCode"))
    if proc.returncode != 0 and not _invalid_job(proc):
        errors.append(f"scontrol: {(proc.stderr or proc.stdout).strip()}")

    try:
        proc = _run(["sacct", "-c", "-n", "-P", "-o", "JobID,State,ExitCode", "-j", job_id], env=env)
        if proc.returncode == 0:
            for line in reversed(proc.stdout.strip().splitlines()):
                parts = line.split("|")
                if parts and parts[0] == job_id and len(parts) >= 2:
                    return JobState(job_id, parts[1], map_state(parts[1]), "sacct",
                                    exit_code=parts[2] if len(parts) > 2 else None)
        else:
            errors.append(f"sacct -c: {(proc.stderr or proc.stdout).strip()}")
    except SlurmError as e:  # sacct missing: fall through to the file
        errors.append(str(e))

    if jobcomp_path is not None:
        rec = read_jobcomp(jobcomp_path, job_id)
        if rec:
            raw = rec.get("JobState")
            return JobState(job_id, raw, map_state(raw), "jobcomp", exit_code=rec.get("ExitCode"))

    if errors and any(e for e in errors if not e.startswith("sacct")):
        return JobState(job_id, None, "unknown", "error", message="; ".join(errors))
    return JobState(job_id, None, "not_found", "none", message="; ".join(errors) or None)


def job_field(job_id: str, name: str, *, env: Mapping[str, str] | None = None) -> str | None:
    """One field of ``scontrol show job -o`` (e.g. ``TresPerNode``), or None."""
    proc = _run(["scontrol", "-o", "show", "job", _check_job_id(job_id)], env=env)
    if proc.returncode != 0:
        return None
    return _parse_kv(proc.stdout).get(name)
