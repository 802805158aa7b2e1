"""train.glue train.compile_only=true: the configured step compiled and its cost printed, nothing trained."""

import os

import pytest

from train import glue


@pytest.mark.slow
def test_compile_only_prints_the_step_cost_and_trains_nothing(tiny, tmp_path, capsys):
  model_dir, data_dir = tiny
  out = tmp_path / "run"
  code = glue.main(
    [
      f"model.name={model_dir}",
      "data.task=local",
      f"data.data_dir={data_dir}",
      f"output_dir={out}",
      "data.num_labels=2",
      "max_length=16",
      "batch_size=8",
      "progress=false",
      "train.compile_only=true",
    ]
  )
  captured = capsys.readouterr()
  printed = captured.out
  assert code == 0, captured.err
  assert "| train step |" in printed and "fits (GiB)" in printed, printed
  line = next(l for l in printed.splitlines() if l.startswith("argument bytes"))
  reported, summed = (
    int(x.replace(",", "")) for x in line.replace("(", " ").replace(")", " ").split() if x.replace(",", "").isdigit()
  )
  assert reported == summed > 0, line
  assert not os.path.exists(out / "checkpoints")
