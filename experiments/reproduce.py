r"""Reproduce the paper's study end to end into a report with tables, figures and claims checked.

  python -m experiments.reproduce --preset=quick --workdir=workdirs/quick
  python -m experiments.reproduce --preset=full --workdir=workdirs/full
  python -m experiments.reproduce --preset=quick --taobao_dir=/data/taobao --workdir=workdirs/q
  python -m experiments.reproduce --preset=quick --datasets=adult,csv --data_path=my.csv \
      --schema=my_schema.json --workdir=workdirs/mine

Writes DIR/REPORT.md, DIR/results.json and PNG figures. A killed run resumes where it
stopped when the same command is run again.
"""

import dataclasses
import pathlib
import time

from absl import app
from absl import flags

from experiments import common
from experiments import records
from experiments import reproducing
from experiments import workdir as workdir_lib
from experiments.configs import base as configs_base
from splitjax import results as sj_results

_PRESET = flags.DEFINE_string(
  "preset", "quick", "quick, full or tiny (configs <dataset>_<preset>)."
)
_DATASETS = flags.DEFINE_list("datasets", ["adult", "bank", "credit"], "Datasets to study.")
_TAOBAO = flags.DEFINE_string("taobao_dir", "", "Directory with the Taobao files (adds taobao).")
flags.mark_flags_as_required(["workdir"])
for _name in common.SHARED_FLAGS["reproduce"]:
  flags.declare_key_flag(_name)


def _presets() -> dict[str, list[str]]:
  """Preset -> datasets that have a ``<dataset>_<preset>`` config."""
  configs = pathlib.Path(__file__).parent / "configs"
  out = {}
  for path in sorted(configs.glob("*_*.py")):
    if path.stem.startswith("_"):
      continue
    ds, preset = path.stem.rsplit("_", 1)
    out.setdefault(preset, []).append(ds)
  return out


def _check_flags() -> None:
  """One clear line for a bad --preset, --datasets or --taobao_dir (before anything is written)."""
  presets = _presets()
  preset = _PRESET.value
  if preset not in presets:
    raise common.UsageError(f"unknown --preset {preset!r}: choose one of {sorted(presets)}")
  if not _DATASETS.value and not _TAOBAO.value:
    raise common.UsageError("--datasets is empty: name at least one, e.g. --datasets=adult")
  if len(set(_DATASETS.value)) != len(_DATASETS.value):
    raise common.UsageError(
      f"--datasets lists a dataset twice ({','.join(_DATASETS.value)}): list each once"
    )
  valid = [d for d in presets[preset] if d != "taobao"] + ["csv"]
  for ds in _DATASETS.value:
    if ds == "csv" and not (common.DATA_PATH.value and common.SCHEMA.value):
      raise common.UsageError(
        "--datasets=csv needs your table and its roles: give "
        "--data_path=FILE and --schema=FILE.json"
      )
    if ds == "taobao":
      raise common.UsageError(
        "taobao is not bundled: drop it from --datasets and give "
        "--taobao_dir=DIR with its files instead"
      )
    if ds not in valid:
      raise common.UsageError(
        f"unknown dataset {ds!r} in --datasets for --preset={preset}: choose among {valid}"
      )
  if (common.DATA_PATH.value or common.SCHEMA.value) and "csv" not in _DATASETS.value:
    raise common.UsageError(
      "--data_path and --schema are used for a csv entry of --datasets: "
      "add csv to --datasets (or drop them)"
    )
  if _TAOBAO.value:
    if "taobao" not in presets[preset]:
      raise common.UsageError(
        f"--preset={preset} has no taobao config: use --preset=quick or full with --taobao_dir"
      )
    if not pathlib.Path(_TAOBAO.value).is_dir():
      raise common.UsageError(
        f"--taobao_dir={_TAOBAO.value} is not a directory: give the "
        "directory holding raw_sample.csv, user_profile.csv, ad_feature.csv"
      )


def csv_study(preset: str, data_path: str, schema: str):
  """The study of the user's table: the preset's adult study (tiny: synthetic's) on csv."""
  template = common.load_config(f"{'synthetic' if preset == 'tiny' else 'adult'}_{preset}", "")
  train = dataclasses.replace(template.train, dataset="csv", data_path=data_path, schema=schema)
  # No published figures to compare with: the tuned recipe only.
  # Training users stay off (about 400 MB of recorded releases per point on adult's size), and so
  # do the audits (the cut and label channels do not depend on the table; `experiments.audit
  # --channel=pipeline --dataset=csv` audits yours).
  return dataclasses.replace(
    template,
    train=train,
    recipes=("tuned",),
    train_user_sigmas=(),
    audit_sigmas=(),
    audit_label_epsilon=0.0,
    audit_pipeline=(),
  )


def _check_same_study(workdir, studies) -> None:
  """Refuses a workdir holding a study of another preset or datasets unless --overwrite."""
  cfg = {
    "preset": _PRESET.value,
    "datasets": list(studies),
    "studies": {ds: configs_base.stored_study_dict(s) for ds, s in studies.items()},
  }
  old_results = workdir / "results.json"
  if (
    not common.overwrite()
    and not (workdir / "reproduce_config.json").exists()
    and old_results.exists()
  ):  # written by splitjax < 0.2: compare preset and datasets
    old = sj_results.read_json(old_results)
    if (old.get("preset"), list(old.get("datasets", {}))) != (cfg["preset"], cfg["datasets"]):
      raise sj_results.WorkdirError(
        f"workdir {workdir} holds a study of --preset={old.get('preset')} "
        f"on {list(old.get('datasets', {}))}: use --overwrite or another "
        "--workdir"
      )
  sj_results.check_config_compatible(
    workdir, cfg, overwrite=common.overwrite(), filename="reproduce_config.json"
  )


def main(argv):
  del argv
  _check_flags()
  datasets = list(_DATASETS.value) + (["taobao"] if _TAOBAO.value else [])
  studies = {}
  for ds in datasets:
    if ds == "csv":
      studies[ds] = csv_study(_PRESET.value, common.DATA_PATH.value, common.SCHEMA.value)
      continue
    study = common.load_config(f"{ds}_{_PRESET.value}", "")
    if ds == "taobao":
      study = dataclasses.replace(
        study, train=dataclasses.replace(study.train, data_path=_TAOBAO.value)
      )
    studies[ds] = study
  with workdir_lib.own(common.WORKDIR.value, "reproduce") as workdir:
    _reproduce(workdir, studies)


def _reproduce(workdir, studies) -> None:
  _check_same_study(workdir, studies)
  t0 = time.time()
  kill = common.KillSwitch()
  results = {"preset": _PRESET.value, "datasets": {}}
  for ds, study in studies.items():
    results["datasets"][ds] = reproducing.run_study(
      study, workdir, overwrite=common.overwrite(), kill_switch=kill
    )
  results["seconds"] = time.time() - t0
  results["environment"] = records.environment()
  sj_results.atomic_write_json(workdir / "results.json", results)
  reproducing.write_report(results, studies, workdir)
  print(f"wrote {workdir / 'REPORT.md'} and results.json in {results['seconds']:.0f} s")


if __name__ == "__main__":
  app.run(common.run_main(main))
