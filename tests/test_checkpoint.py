"""Checkpoint integrity: a checksum of the saved arrays is checked at restore (damaged data counts as corrupt), and a
save that fails for want of space stops with one line naming the last complete checkpoint."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
META = {"best": {}, "data_position": {}}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int32", "bool"])
def test_fingerprint_sees_one_changed_or_moved_value(dtype):
  import jax.numpy as jnp
  from train.checkpoint import fingerprint

  x = jnp.asarray(np.arange(12).reshape(3, 4) % 2 if dtype == "bool" else np.arange(12.0).reshape(3, 4), dtype)
  base, finite = fingerprint({"x": x, "step": jnp.int32(3)})
  assert finite and base == fingerprint({"x": jnp.array(x), "step": jnp.int32(3)})[0]
  flipped = x.at[1, 2].set(x[1, 2] == 0 if dtype == "bool" else x[1, 2] + 1)
  assert fingerprint({"x": flipped, "step": jnp.int32(3)})[0] != base
  assert fingerprint({"x": x.T.reshape(3, 4), "step": jnp.int32(3)})[0] != base  # same values, other places
  assert fingerprint({"x": x, "step": jnp.int32(4)})[0] != base
  if dtype in ("float32", "bfloat16"):
    assert not fingerprint({"x": x.at[0, 0].set(jnp.inf)})[1]


def _metadata(step_dir):
  return os.path.join(step_dir, "meta", "metadata")


def test_a_checkpoint_whose_arrays_differ_from_their_checksum_is_moved_aside(tmp_path, capfd):
  import jax.numpy as jnp
  from train.checkpoint import Checkpoints

  like = {"w": jnp.zeros((16, 16)), "step": jnp.zeros((), jnp.int32)}
  writer = Checkpoints(str(tmp_path), keep=3)
  for step in (1, 2, 3):
    writer.save(step, {"w": jnp.full((16, 16), float(step)), "step": jnp.int32(step)}, {"step": step, **META})
  writer.wait()
  writer.close()
  latest = tmp_path / "latest"
  meta = json.loads(open(_metadata(latest / "3")).read())
  assert len(meta["state_checksum"]) == 16 and meta["finite"] is True
  meta["state_checksum"] = "0" * 16  # as if the arrays had changed after the save
  meta.pop("meta_checksum")  # (a meta as written before it had its own checksum)
  open(_metadata(latest / "3"), "w").write(json.dumps(meta))
  reader = Checkpoints(str(tmp_path), keep=3)
  state, meta = reader.restore_latest(like)
  reader.close()
  assert meta["step"] == 2 and float(state["w"][0, 0]) == 2.0
  said = [line for line in capfd.readouterr().out.splitlines() if "cannot be restored" in line]
  assert len(said) == 1 and "checksum differs" in said[0] and "3.corrupt" in said[0]


def test_a_full_disk_stops_with_one_line_naming_the_last_complete_checkpoint(tmp_path):
  """RLIMIT_FSIZE makes the second save's array file fail to write, as a full disk does (EFBIG for ENOSPC)."""
  script = textwrap.dedent(f"""
        import resource, signal
        import jax.numpy as jnp
        from train.checkpoint import CheckpointError, Checkpoints
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing us
        checkpoints = Checkpoints({str(tmp_path)!r}, keep=2)
        meta = {META!r}
        checkpoints.save(1, {{"w": jnp.ones(8)}}, {{"step": 1, **meta}})
        checkpoints.wait()
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        try:
            checkpoints.save(2, {{"w": jnp.ones(8)}}, {{"step": 2, **meta}})
            checkpoints.save(3, {{"w": jnp.arange(10**6, dtype=jnp.float32)}}, {{"step": 3, **meta}})
            for _ in range(100):
                checkpoints.check()  # what the loop calls every step
            checkpoints.wait()
        except CheckpointError as e:
            print("error:", e)
        finally:
            checkpoints.close()
        """)
  proc = subprocess.run([sys.executable, "-c", script], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stderr == "" and proc.stdout.count("\n") == 1, proc.stdout + proc.stderr
  line = proc.stdout.strip()
  assert line.startswith(f"error: saving checkpoint step 3 to {tmp_path}/latest failed (File too large)"), line
  assert "the last complete checkpoint is step 2" in line and "resume=true" in line


def test_fingerprint_does_not_depend_on_the_sharding():
  """Resume may land on another mesh: the checksum of arrays split over 4 devices equals that of one copy."""
  script = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from train.checkpoint import fingerprint
        mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "fsdp"))
        tree = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((8, 12)), jnp.float32),
                "m": jnp.arange(16, dtype=jnp.bfloat16)}
        split = {"w": jax.device_put(tree["w"], NamedSharding(mesh, P("data", "fsdp"))),
                 "m": jax.device_put(tree["m"], NamedSharding(mesh, P(("data", "fsdp"))))}
        assert len(split["w"].sharding.device_set) == 4
        print(fingerprint(tree)[0] == fingerprint(split)[0])
        """)
  env = dict(ENV, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip() == "True"


def test_a_damaged_best_checkpoint_is_an_error(tmp_path):
  import jax.numpy as jnp
  from train.checkpoint import CheckpointError, Checkpoints

  writer = Checkpoints(str(tmp_path), keep=2)
  writer.save_best(4, {"w": jnp.full((4, 4), 4.0)}, {"step": 4}, score=0.5)
  writer.wait()
  params, meta = writer.restore_best({"w": jnp.zeros((4, 4))})
  assert meta["step"] == 4 and float(params["w"][0, 0]) == 4.0
  writer.close()
  path = _metadata(tmp_path / "best" / "4")
  meta = json.loads(open(path).read())
  open(path, "w").write(json.dumps({**meta, "params_checksum": "0" * 16}))
  reader = Checkpoints(str(tmp_path), keep=2)
  with pytest.raises(CheckpointError, match="kept-best checkpoint .*4 is damaged"):
    reader.restore_best({"w": jnp.zeros((4, 4))})
  reader.close()
