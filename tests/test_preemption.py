"""Nothing lost, nothing mixed: SIGTERM saves and stops (a second signal exits at once), resume after it equals an
uninterrupted run, a resume with a changed config is refused, and a run directory has one owner."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_reliability import ENV, ROOT  # noqa: E402  (the subprocesses' environment)
from test_train_loop import tiny_args, tiny_config, tiny_data, tiny_model  # noqa: E402,F401  (fixtures)

RUN = ("max_steps=12", "eval_every=6", "save_every=100", "log_every=3", "export_peft=false")


def _records(output_dir):
  """metrics.jsonl without the wall-clock field."""
  lines = (output_dir / "metrics.jsonl").read_text().splitlines()
  return [{k: v for k, v in json.loads(line).items() if k != "train/steps_per_s"} for line in lines]


@pytest.mark.slow
def test_sigterm_saves_and_resume_equals_uninterrupted_run(tiny_model, tiny_data, tmp_path):
  """The process sends itself SIGTERM while step 5 runs (save_every=100: no checkpoint would exist): it saves step
  5, says so in one line and exits 75; resume=true then ends with the metrics, gates and loss curve of a straight
  run (log_every=3: the record of step 6 averages steps 4-6 across the stop). A resume that changes the learning
  rate is refused in one line naming the key and both values, and leaves the checkpoint as it was."""
  from train.checkpoint import CheckpointError
  from train.loop import run

  stopped = tmp_path / "stopped"
  args = _cli_args(tiny_model, tiny_data, stopped)
  script = textwrap.dedent(f"""
        import os, signal, sys
        from train import data
        call = data.TrainBatches.__call__
        def batches(self, step):
            if step == 4:  # the 5th step: the signal arrives while it is being prepared and run
                os.kill(os.getpid(), signal.SIGTERM)
            return call(self, step)
        data.TrainBatches.__call__ = batches
        from train.glue import main
        sys.exit(main({args!r}))
        """)
  proc = subprocess.run([sys.executable, "-c", script], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 75, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("stopped by SIGTERM after step 5;") and "resume=true" in last, proc.stderr[-2000:]
  assert sorted(os.listdir(stopped / "checkpoints" / "latest")) == ["5"]
  assert not (stopped / ".lock").exists()

  with pytest.raises(CheckpointError) as e:
    run(tiny_config(tiny_model, tiny_data, stopped, *RUN, "resume=true", "learning_rate=2e-2"))
  assert "optim.learning_rate: 0.01 -> 0.02" in str(e.value) and "\n" not in str(e.value)
  assert sorted(os.listdir(stopped / "checkpoints" / "latest")) == ["5"]

  resumed = run(tiny_config(tiny_model, tiny_data, stopped, *RUN, "resume=true"))
  straight = run(tiny_config(tiny_model, tiny_data, tmp_path / "straight", *RUN))
  assert resumed["metrics"] == straight["metrics"] and resumed["ranks"] == straight["ranks"]
  assert resumed["best"] == straight["best"]
  assert _records(stopped) == _records(tmp_path / "straight")


def _cli_args(model, data_dir, output_dir):
  return tiny_args(model, data_dir, output_dir, *RUN)


def test_second_signal_exits_at_once():
  """The first SIGTERM is only recorded; the second ends the process with 128 + 15."""
  script = textwrap.dedent("""
        import os, signal, time
        from train.preemption import StopSignal
        with StopSignal() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.received == signal.SIGTERM and stop.agreed()
            print("survived the first", flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        print("not reached")
        """)
  proc = subprocess.run([sys.executable, "-c", script], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
  assert proc.stdout.strip() == "survived the first"
  assert "SIGTERM again: exiting now" in proc.stderr


def test_stop_signal_puts_the_previous_handlers_back():
  before = signal.getsignal(signal.SIGINT)
  from train.preemption import StopSignal

  with StopSignal():
    assert signal.getsignal(signal.SIGINT) != before
  assert signal.getsignal(signal.SIGINT) == before


# ---------------------------------------------------------------------------------------------------------------
# one owner per run directory


def test_a_second_process_is_refused_and_a_dead_owner_s_lock_is_taken_over(tmp_path, capsys):
  from train import rundir

  holder = subprocess.Popen(
    [
      sys.executable,
      "-c",
      "import sys, time; from train import rundir; "
      f"rundir.claim({str(tmp_path)!r}, False, False); print('locked', flush=True); "
      "time.sleep(120)",
    ],
    env=ENV,
    cwd=ROOT,
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(rundir.RunDirectoryError) as e:
      rundir.claim(str(tmp_path), True, False)
    assert f"process {holder.pid}" in str(e.value) and "in use by another run" in str(e.value)
  finally:
    holder.kill()
    holder.wait()
  lock = rundir.claim(str(tmp_path), True, False)  # its owner is gone: stale
  assert f"left by process {holder.pid}" in capsys.readouterr().out
  assert json.loads(open(lock).read())["pid"] == os.getpid()
  rundir.release(lock)
  assert not os.path.exists(lock)


def test_a_new_run_into_a_used_directory_is_refused_before_anything_is_touched(tmp_path, capsys):
  from train import rundir

  (tmp_path / "checkpoints" / "latest" / "4").mkdir(parents=True)
  (tmp_path / "metrics.jsonl").write_text('{"step": 4}\n')
  with pytest.raises(rundir.RunDirectoryError) as e:
    rundir.claim(str(tmp_path), False, False)
  message = str(e.value)
  assert "holds another run (checkpoints, metrics.jsonl)" in message
  assert "resume=true" in message and "overwrite=true" in message and "output_dir" in message
  assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 4}\n' and not (tmp_path / ".lock").exists()
  rundir.release(rundir.claim(str(tmp_path), True, False))  # resume: allowed, nothing deleted
  assert (tmp_path / "checkpoints" / "latest" / "4").is_dir()
  rundir.release(rundir.claim(str(tmp_path), False, True))  # overwrite: the old run is deleted
  assert sorted(os.listdir(tmp_path)) == [] and "deleted the previous run" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# resume with a changed config
