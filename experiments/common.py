"""Flags, config loading and error handling shared by the experiment binaries."""

import dataclasses
import importlib
import importlib.util
import logging as std_logging
import os
import pathlib
import sys
import time
from collections.abc import Callable

from absl import flags
from absl import logging

FLAGS = flags.FLAGS

_DEBUG = flags.DEFINE_bool("debug", False, "Show full tracebacks instead of one-line errors.")
_RESUME = flags.DEFINE_bool("resume", False, "Continue a killed run from its last checkpoint.")
_OVERWRITE = flags.DEFINE_bool(
  "overwrite", False, "Allow replacing results of another configuration in --workdir."
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "Multi-host: address of process 0 (jax.distributed)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's id.")

# Flags shared by several binaries are defined once here, so that every binary can be imported
# in one process (the tests call each main(argv) in-process).
WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (required).")
CONFIG = flags.DEFINE_string(
  "config",
  None,
  "Config name in experiments/configs or a .py path (default: the config named by --dataset).",
)
DATASET = flags.DEFINE_string("dataset", "adult", "adult, bank, credit, taobao, csv or synthetic.")
SEED = flags.DEFINE_integer("seed", 0, "Seed (parameters, data split and order, DP noise).")
flags.DEFINE_string(
  "releases",
  "last_epoch",
  "train: last_epoch records the last epoch's cut-layer traffic; all also every release of "
  "every epoch with its parameters (releases/). attack --users=train: last_epoch attacks each "
  "recorded row alone, all combines every release of a user (needs train --releases=all).",
)
DATA_PATH = flags.DEFINE_string(
  "data_path",
  "",
  "The table for --dataset=csv (a delimited text file, plain or gzip), a UCI "
  "bank-full.csv for bank, or the directory of the taobao files.",
)
SCHEMA = flags.DEFINE_string(
  "schema",
  "",
  "Column roles of --data_path (csv, bank, taobao): a JSON file with keys among "
  "private_categorical, private_dense, server_categorical, server_dense, label, ignore, "
  "delimiter, positive_label. For csv, columns it does not list go to the server by type.",
)

KILL_ENV = "SPLITJAX_TEST_KILL_AFTER"
# Test-only: rows per resumable attack block (experiments.attacking.BLOCK when unset), so that a
# tiny transcript spans several blocks and a kill between them can be tested.
ATTACK_BLOCK_ENV = "SPLITJAX_TEST_ATTACK_BLOCK"

# Lines that tell a user nothing: JAX probing for a TPU on a CPU/GPU machine, and matplotlib
# building its font cache. Their loggers are quietened; JAX_PLATFORMS stays the user's choice.
for _name, _level in (
  ("jax._src.xla_bridge", std_logging.WARNING),
  ("matplotlib.font_manager", std_logging.ERROR),
):
  std_logging.getLogger(_name).setLevel(_level)

# The shared flags each binary uses. Each binary declares them as its key flags
# (`flags.declare_key_flag` at its top level: absl finds the declaring module on the stack), so
# that its --help lists them.
SHARED_FLAGS = {
  "train": (
    "workdir",
    "config",
    "dataset",
    "data_path",
    "schema",
    "seed",
    "releases",
    "resume",
    "overwrite",
    "debug",
    "coordinator_address",
    "num_processes",
    "process_id",
  ),
  "attack": (
    "workdir",
    "seed",
    "num_examples",
    "releases",
    "resume",
    "overwrite",
    "debug",
    "coordinator_address",
    "num_processes",
    "process_id",
  ),
  "sweep": (
    "workdir",
    "config",
    "dataset",
    "data_path",
    "schema",
    "num_examples",
    "overwrite",
    "debug",
  ),
  "reproduce": ("workdir", "data_path", "schema", "overwrite", "debug"),
}


def progress(message: str) -> None:
  """Progress and diagnostics of the binaries: absl logging (see --verbosity, --log_dir)."""
  logging.info("%s", message)


class ProgressPrinter:
  """Hands one progress line per ``every`` seconds to ``printer`` (progress on long runs).

  The first step includes compilation, so the rate behind the ETA is measured from the end of the
  first step on; until a second step has finished no ETA is given.
  """

  def __init__(
    self, total: int, label: str, every: float = 5.0, printer: Callable[[str], None] | None = None
  ):
    self.total, self.label, self.every = total, label, every
    self.printer = printer if printer is not None else (lambda line: None)
    self.start = self.last = time.time()
    self.first_done: float | None = None  # time at which the first (compiling) step finished

  def __call__(self, done: int, extra: str = ""):
    now = time.time()
    if done >= 1 and self.first_done is None:
      self.first_done = now
    if now - self.last >= self.every or done == self.total:
      self.last = now
      if done >= 2 and self.first_done is not None and now > self.first_done:
        rate = (done - 1) / (now - self.first_done)
        eta = f"eta {(self.total - done) / rate:.1f}s"
      else:
        eta = "eta after the first compiled step"
      self.printer(
        f"[{self.label}] {done}/{self.total} ({100.0 * done / max(self.total, 1):.0f}%)"
        f" {now - self.start:.1f}s elapsed, {eta} {extra}".rstrip()
      )


def fit_callbacks(progress, protocol_name: str, epochs: int):
  """``(on_step, epoch_line)`` for `training.fit`: per-step lines every few seconds through a
  `ProgressPrinter` per epoch, and one line per epoch with its training loss (None, None when
  ``progress`` is None)."""
  if not progress:
    return None, None
  bars: dict = {}

  def on_step(epoch: int, done: int, total: int) -> None:
    if epoch not in bars:
      bars.clear()
      bars[epoch] = ProgressPrinter(
        total, f"{protocol_name} epoch {epoch + 1}/{epochs}", printer=progress
      )
    bars[epoch](done)

  def epoch_line(epoch: int, log: dict) -> None:
    progress(
      f"[{protocol_name}] epoch {epoch + 1}/{epochs}: train loss {log['train_loss']:.4f} "
      f"({log['seconds']:.1f} s)"
    )

  return on_step, epoch_line


class UsageError(ValueError):
  """A bad flag value: the message names the flag and the fix."""


def format_number(value, digits: int = 4) -> str:
  """A number with `digits` significant digits ("inf" and "nan" as such; strings pass through;
  None is empty)."""
  if value is None:
    return ""
  if isinstance(value, str):
    return value
  return f"{float(value):.{digits}g}"


def format_epsilons(metrics: dict) -> str:
  """Every epsilon of a privacy report with the channel it covers (never a bare "epsilon")."""
  delta = format_number(metrics.get("delta", 0.0), 3)
  parts = [
    f"cut layer in training {format_number(metrics['epsilon'])} "
    f"(k = {metrics.get('releases', '?')} releases)",
    f"one attacked release {format_number(metrics['attack_epsilon'])}",
  ]
  if "label_epsilon" in metrics:
    parts.append(f"label (randomized response) {format_number(metrics['label_epsilon'])}")
  parts.append(f"device updates {format_number(metrics['device_epsilon'])}")
  parts.append(f"total {format_number(metrics['total_epsilon'])}")
  return f"epsilon at delta {delta}: " + "; ".join(parts)


def debug() -> bool:
  return _DEBUG.value


def resume() -> bool:
  return _RESUME.value


def overwrite() -> bool:
  return _OVERWRITE.value


def run_main(main_fn):
  """Wraps ``main(argv)``: known errors print one line and exit 2 (traceback with --debug)."""

  def wrapped(argv):
    if FLAGS.log_dir:
      logging.get_absl_handler().use_absl_log_file()
    if _COORDINATOR.value:
      from splitjax import training  # pylint: disable=g-import-not-at-top

      training.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    CHECKPOINTS.clear()
    try:
      return main_fn(argv)
    except KeyboardInterrupt:  # Ctrl-C: one line, exit 130 (128 + SIGINT)
      if _DEBUG.value:
        raise
      done = f"after {CHECKPOINTS[-1]}" if CHECKPOINTS else "before its first checkpoint"
      print(
        f"interrupted {done}; rerun the same command with --resume to continue", file=sys.stderr
      )
      sys.exit(130)
    except KeyError as e:  # a bare KeyError prints as 'name': say what is missing
      if _DEBUG.value:
        raise
      print(
        f"error: a file or config lacks the entry {e.args[0]!r} that this splitjax needs; "
        "rerun with --debug to see which, then fix or regenerate it",
        file=sys.stderr,
      )
      sys.exit(2)
    except (ValueError, OSError, FloatingPointError) as e:  # one clear line
      if _DEBUG.value:
        raise
      print(f"error: {first_line(e)}{flag_hint(e)}", file=sys.stderr)
      sys.exit(2)
    except Exception as e:  # unexpected: still no bare traceback unless --debug
      if _DEBUG.value:
        raise
      print(
        f"error: internal error ({type(e).__name__}: {first_line(e)}); rerun with --debug "
        "and report it",
        file=sys.stderr,
      )
      sys.exit(3)

  return wrapped


# What the running binary has checkpointed so far ("epoch 3 of 10"), for the Ctrl-C line.
CHECKPOINTS: list[str] = []


def checkpointed(what: str) -> None:
  """Records that ``what`` is on disk (a rerun with --resume continues after it)."""
  CHECKPOINTS.append(what)


# The flags that fix a library file error, by (error class name, reason): the library's messages
# state the problem (and any fix without flags), the binaries add these. Each hint starts with
# the punctuation that joins it to the library's message.
_FLAG_HINTS = {
  ("ResultsError", "missing"): ", or check --workdir",
  ("ResultsError", "unreadable"): ": check --workdir",
  ("ResultsError", "corrupted"): ", or use --overwrite",
  ("WorkdirError", "not_writable"): ": choose another --workdir",
  ("WorkdirError", "config_differs"): ": use --overwrite or another --workdir",
  ("WorkdirError", "config_unreadable"): ": use --overwrite or another --workdir",
  ("WriteError", "no_space"): ", or choose another --workdir",
  ("WriteError", "not_permitted"): ", or choose another --workdir",
  ("WriteError", "os_error"): ", or choose another --workdir",
  ("CheckpointError", "missing"): ": run experiments.train first or check --workdir",
  ("CheckpointError", "unreadable"): ": check --workdir",
  ("CheckpointError", "corrupted"): ": delete it and rerun experiments.train, or use --overwrite",
  ("CheckpointError", "version"): ": rerun experiments.train",
  ("CheckpointError", "other_config"): "; use a fresh --workdir or --overwrite",
  ("CheckpointError", "structure"): "; use a fresh --workdir or --overwrite",
  ("DataError", "schema"): " (the schema is the JSON file of --schema)",
  ("DataError", "no_table"): ": --data_path=FILE and --schema=FILE.json",
  ("DataError", "no_directory"): ": --data_path=DIR (reproduce: --taobao_dir=DIR)",
  ("DataError", "path_not_taken"): ": drop --data_path, or use --dataset=csv with --data_path "
  "and --schema",
}


def flag_hint(e: BaseException) -> str:
  """The command-line fix of a ``splitjax.results`` / ``splitjax.checkpointing`` /
  ``splitjax.data`` error, to append to its message (empty for any other error, or one raised
  without a ``reason``)."""
  from splitjax import data  # pylint: disable=import-outside-toplevel
  from splitjax import results  # pylint: disable=import-outside-toplevel

  if not isinstance(e, (results.FileError, data.DataError)) or e.reason is None:
    return ""
  for cls in type(e).__mro__:
    hint = _FLAG_HINTS.get((cls.__name__, e.reason))
    if hint is not None:
      return hint
  return ""


def first_line(e: BaseException) -> str:
  """The first line of an exception's message (JAX's traceback-filtering note, which it adds
  as a note or after the message, never reaches the console), or its type name."""
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


MEMORY_FRACTION = 0.8  # refuse a run whose estimated memory exceeds this share of what is free


def available_memory_bytes() -> tuple[int, str]:
  """(bytes, where) free for a run on the default device: the accelerator's free memory
  (``memory_stats``), or on CPU the host's MemAvailable (``/proc/meminfo``, else ``os.sysconf``)."""
  import jax  # pylint: disable=import-outside-toplevel

  device = jax.devices()[0]
  if device.platform != "cpu":
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
      return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0)), f"{device.platform} memory"
  try:
    with open("/proc/meminfo", encoding="ascii") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024, "available RAM"
  except OSError:
    pass
  return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free RAM"


def check_memory(estimate_bytes: int, what: str, override_flag: str) -> None:
  """Refuses a run whose memory estimate exceeds MEMORY_FRACTION of the free memory.

  Raises:
    UsageError: naming the estimate, the memory and ``override_flag``.
  """
  free, where = available_memory_bytes()
  if estimate_bytes > MEMORY_FRACTION * free:
    raise UsageError(
      f"{what} needs at least {estimate_bytes / 2**30:,.1f} GiB, more than "
      f"{MEMORY_FRACTION:.0%} of the {free / 2**30:,.1f} GiB of {where}: use fewer "
      f"or lower-cardinality private features, or pass {override_flag} to try "
      "anyway"
    )


class KillSwitch:
  """Test-only fault injection: ``SPLITJAX_TEST_KILL_AFTER=N`` exits hard after N checkpoints."""

  def __init__(self):
    value = os.environ.get(KILL_ENV, "")
    self.after = int(value) if value.strip() else None
    self.count = 0

  def tick(self):
    self.count += 1
    if self.after is not None and self.count >= self.after:
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(75)  # like a kill: no cleanup, no final writes


def load_config(name_or_path: str, default_name: str, module_prefix: str = "experiments.configs"):
  """``get_config()`` of ``experiments/configs/<name>.py`` or of a ``.py`` file path."""
  name = name_or_path or default_name
  if name.endswith(".py"):
    path = pathlib.Path(name)
    if not path.is_file():
      raise UsageError(
        f"--config file {name} not found: give a path to a .py file with get_config()"
      )
    spec = importlib.util.spec_from_file_location("splitjax_user_config", path)
    module = importlib.util.module_from_spec(spec)
    try:
      spec.loader.exec_module(module)
      if not callable(getattr(module, "get_config", None)):
        raise UsageError(
          f"--config file {name} defines no get_config(): add a function "
          "get_config() that returns a TrainConfig (see experiments/configs)"
        )
      return module.get_config()
    except UsageError:
      raise
    except Exception as e:  # the user's file: say where in it
      raise UsageError(
        f"--config file {name}{_line_in(e, path)}: {type(e).__name__}: "
        f"{first_line(e)}; fix that file"
      ) from None
  else:
    try:
      module = importlib.import_module(f"{module_prefix}.{name}")
    except ModuleNotFoundError:
      configs_dir = pathlib.Path(__file__).parent / "configs"
      names = sorted(
        p.stem for p in configs_dir.glob("*.py") if not p.stem.startswith("_") and p.stem != "base"
      )
      raise UsageError(f"unknown config {name!r}: choose one of {names} or a .py path") from None
  return module.get_config()


def _line_in(e: BaseException, path: pathlib.Path) -> str:
  """The text " line N" of the deepest traceback frame (or syntax error) in the file ``path``."""
  if isinstance(e, SyntaxError) and e.lineno:
    return f" line {e.lineno}"
  line, tb, target = "", e.__traceback__, os.path.realpath(path)
  while tb is not None:
    if os.path.realpath(tb.tb_frame.f_code.co_filename) == target:
      line = f" line {tb.tb_lineno}"
    tb = tb.tb_next
  return line


def load_train_config(name_or_path: str, default_name: str):
  """A TrainConfig by name; a reproduce StudyConfig gives its base training config."""
  if (
    not name_or_path
    and not (pathlib.Path(__file__).parent / "configs" / f"{default_name}.py").exists()
  ):
    # No config module for this dataset (csv, taobao, or a typo the loader reports).
    from experiments.configs import base  # pylint: disable=g-import-not-at-top

    return base.TrainConfig(dataset=default_name)
  config = load_config(name_or_path, default_name)
  return getattr(config, "train", config)


# Flags whose value 0 is the "off" default: given explicitly, 0 is a mistake (epsilon = 0 would be
# perfect privacy, and silently turning DP off instead is the worst reading of it).
_ZERO_MEANS_OFF = {
  "target_epsilon": "omit --target_epsilon for no calibration, or give a positive epsilon",
  "label_dp_epsilon": "omit --label_dp_epsilon for no label DP, or give a positive epsilon",
}


def given(name: str) -> bool:
  """Whether flag ``name`` was set explicitly (command line or flagsaver), not left as default."""
  return name in FLAGS and (FLAGS[name].present or not FLAGS[name].using_default_value)


def apply_flag_overrides(config, flag_names):
  """Replaces config fields whose flags were given explicitly on the command line.

  Raises:
    UsageError: an explicit 0 for a flag whose 0 means "off" (``--target_epsilon=0``).
  """
  fields = {f.name: f for f in dataclasses.fields(config)}
  for name, fix in _ZERO_MEANS_OFF.items():
    if name in fields and name in flag_names and given(name) and FLAGS[name].value == 0:
      raise UsageError(f"--{name}=0 is not a valid epsilon (it must be > 0): {fix}")
  for name in flag_names:
    # An override flag left unset (None) keeps the config's value; an explicit 0 is a mistake
    # (it used to mean "the recipe's value" silently: --epochs=0 trained 10 epochs).
    if name in fields and given(name) and FLAGS[name].default is None and (FLAGS[name].value == 0):
      raise UsageError(
        f"--{name}={FLAGS[name].value} must be > 0: omit --{name} for the config's (recipe's) value"
      )
  updates = {}
  for name in flag_names:
    if name in fields and given(name) and FLAGS[name].value is not None:
      value = FLAGS[name].value
      if isinstance(getattr(config, name), tuple):
        value = tuple(
          type(getattr(config, name)[0])(v) if getattr(config, name) else v for v in value
        )
      updates[name] = value
  return dataclasses.replace(config, **updates)


def config_dict(config) -> dict:
  return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
