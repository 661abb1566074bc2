r"""Reproduce the paper's study end to end into a report with tables, figures and claims checked.

  python -m experiments.reproduce --preset=quick --workdir=workdirs/quick
  python -m experiments.reproduce --preset=full --workdir=workdirs/full
  python -m experiments.reproduce --preset=quick --taobao_dir=/data/taobao --workdir=workdirs/q

Writes DIR/REPORT.md, DIR/results.json and PNG figures. A killed run resumes where it
stopped when the same command is run again.
"""

import dataclasses
import time

from absl import app
from absl import flags

from splitjax import io
from experiments import common
from experiments import reproducing

_PRESET = flags.DEFINE_string("preset", "quick", "quick, full or tiny (configs <dataset>_<preset>).")
_DATASETS = flags.DEFINE_list("datasets", ["adult", "bank", "credit"], "Datasets to study.")
_TAOBAO = flags.DEFINE_string("taobao_dir", "", "Directory with the Taobao files (adds taobao).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  datasets = list(_DATASETS.value) + (["taobao"] if _TAOBAO.value else [])
  studies = {}
  for ds in datasets:
    study = common.load_config(f"{ds}_{_PRESET.value}", "")
    if ds == "taobao":
      study = dataclasses.replace(study, train=dataclasses.replace(study.train,
                                                                   data_path=_TAOBAO.value))
    studies[ds] = study
  workdir = io.ensure_workdir(common.WORKDIR.value)
  t0 = time.time()
  kill = common.KillSwitch()
  results = {"preset": _PRESET.value, "datasets": {}}
  for ds, study in studies.items():
    results["datasets"][ds] = reproducing.run_study(study, workdir, kill_switch=kill)
  results["seconds"] = time.time() - t0
  io.atomic_write_json(workdir / "results.json", results)
  reproducing.write_report(results, studies, workdir)
  print(f"wrote {workdir / 'REPORT.md'} and results.json in {results['seconds']:.0f} s")


if __name__ == "__main__":
  app.run(common.run_main(main))
