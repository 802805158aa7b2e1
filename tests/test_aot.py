"""train.aot: collectives read from HLO text, on a 4 x 2 ('fsdp', 'tp') mesh (partition id = fsdp * 2 + tp)."""

import pytest

from train import aot

MESH, AXES = (4, 2), ("fsdp", "tp")

_HLO = """
ENTRY %main {
  %ar.1 = f32[8,128]{1,0} all-reduce(f32[8,128]{1,0} %p), channel_id=1, replica_groups=[4,2]<=[8], to_apply=%add
  %ar.2 = (f32[4]{0}, bf16[2,2]{1,0}) all-reduce(%a, %b), channel_id=2, replica_groups=[2,4]<=[4,2]T(1,0)
  %ag.1 = f32[16,8]{1,0} all-gather(f32[2,8]{1,0} %q), channel_id=3, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  %ags = (f32[2]{0}, f32[8]{0}) all-gather-start(f32[2]{0} %r), channel_id=4, replica_groups={{0,2,4,6},{1,3,5,7}}
  %agd = f32[8]{0} all-gather-done(%ags)
  %cp = s32[3]{0} collective-permute(s32[3]{0} %s), channel_id=5, source_target_pairs={{0,1},{1,0}}
  ROOT %rs = f32[1,8]{1,0} reduce-scatter(f32[2,8]{1,0} %t), channel_id=6, replica_groups={{0},{1}}, dimensions={0}
}
"""


def test_collectives_by_kind_bytes_and_mesh_axes():
  found = {(c.kind, c.axes): (c.count, c.bytes) for c in aot.collectives(_HLO, MESH, AXES)}
  assert found == {
    ("all-reduce", "tp"): (1, 8 * 128 * 4),  # groups {0,1}, {2,3}, ...: pairs along tp
    ("all-reduce", "fsdp"): (1, 4 * 4 + 2 * 2 * 2),  # iota transposed: {0,2,4,6}, {1,3,5,7}
    ("all-gather", "fsdp+tp"): (1, 16 * 8 * 4),
    ("all-gather", "fsdp"): (1, 8 * 4),  # async: counted once, its result array's bytes
    ("collective-permute", "tp"): (1, 3 * 4),
    ("reduce-scatter", "-"): (1, 8 * 4),  # groups of one device span no axis
  }


@pytest.mark.parametrize("temp, fits", [(2**30, (16, 32)), (20 * 2**30, (32,)), (40 * 2**30, ())])
def test_peak_and_device_fit(temp, fits):
  cost = aot.StepCost(argument=2**30, output=2**29, alias=2**29, temp=temp, flops=1.0, collectives=())
  assert cost.peak == 2**30 + temp
  assert tuple(m for m in (16, 32) if cost.fits(m)) == fits


@pytest.mark.parametrize(
  "groups, axes",
  [
    ("mesh['axis_0'=4,'axis_1'=1,'axis_2'=2] {'axis_2'}", "tp"),  # ids in order: pairs
    ("mesh['axis_0'=4,'axis_1'=2] {'axis_0'}", "fsdp"),
    ("mesh['axis_0'=2,'axis_1'=4], device_ids=([4,2]T(1,0)) {'axis_0'}", "tp"),  # ids transposed
    ("mesh['axis_0'=2,'axis_1'=4], device_ids=([4,2]T(1,0)) {'axis_1'}", "fsdp"),
    ("mesh['axis_0'=4,'axis_1'=2] {'axis_0','axis_1'}", "fsdp+tp"),
  ],
)
def test_xla_mesh_form_replica_groups(groups, axes):
  hlo = f"  %x = f32[8]{{0}} all-reduce(f32[8]{{0}} %p), channel_id=1, replica_groups={groups}, to_apply=%add"
  assert [(c.kind, c.axes, c.count, c.bytes) for c in aot.collectives(hlo, MESH, AXES)] == [("all-reduce", axes, 1, 32)]
