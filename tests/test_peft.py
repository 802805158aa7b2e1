"""PEFT LoRA export and import against the real `peft` package on transformers' PyTorch models (CPU)."""

import json
import logging

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from flax import traverse_util  # noqa: E402

from conftest import ENCODER_SIZES, tiny_encoder_config  # noqa: E402
from sora_jax import SoraConfig, apply_factored, init, merge, prune, rank_report  # noqa: E402
from sora_jax.models import EncoderNaming, family_module, from_pretrained  # noqa: E402
from sora_jax.peft import save_peft  # noqa: E402
from sora_jax.peft_load import load_peft  # noqa: E402

TOL = 1e-4
VOCAB = ENCODER_SIZES["vocab_size"]
CONFIGS = {
  "bert": lambda: tiny_encoder_config("bert"),
  "roberta": lambda: tiny_encoder_config("roberta", pad_token_id=1),  # classifier = dense + out_proj
  "deberta-v2": lambda: tiny_encoder_config(
    "deberta-v2",
    relative_attention=True,
    position_buckets=16,
    max_relative_positions=-1,
    share_att_key=True,
    pos_att_type=["p2c", "c2p"],
    position_biased_input=False,
    norm_rel_ebd="layer_norm",
    type_vocab_size=0,
    pad_token_id=0,
  ),
}
# PEFT's own way of naming the six dense layers of a block (a regex over transformers module names).
PEFT_TARGETS = (
  r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)(_proj)?|attention\.output\.dense"
  r"|intermediate\.dense|output\.dense)"
)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """model_type -> directory of a random transformers sequence classifier."""
  out = {}
  for model_type, make in CONFIGS.items():
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(make()).eval()
    directory = tmp_path_factory.mktemp(model_type.replace("-", "_"))
    model.save_pretrained(directory)
    out[model_type] = str(directory)
  return out


def _inputs(seq=10):
  rng = np.random.default_rng(0)
  ids = rng.integers(2, VOCAB, (3, seq))
  mask = np.ones_like(ids)
  mask[1, 6:] = 0
  mask[2, 3:] = 0
  return ids, mask


def _torch_base(directory):
  return transformers.AutoModelForSequenceClassification.from_pretrained(directory).eval()


def _torch_logits(model, ids, mask):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def _randomise_head(params, seed=1):
  """A trained head differs from the checkpoint's; modules_to_save must carry it."""
  flat = traverse_util.flatten_dict(params)
  rng = np.random.default_rng(seed)
  for path in sorted(flat):
    if any(part in ("classifier", "pooler") for part in path):
      flat[path] = np.asarray(flat[path]) + 0.2 * rng.standard_normal(flat[path].shape).astype(np.float32)
  return traverse_util.unflatten_dict(flat)


def _logits(model, params, ids, mask, config=None):
  """Logits of our model, factored when a SoRA config is given. Eager: the tiny models' ops compile once per shape
  for all tests, cheaper on CPU than compiling each whole forward."""
  if config is None:
    return np.asarray(model.apply({"params": params}, ids, mask))
  return np.asarray(apply_factored(model, {"params": params}, ids, mask, config=config))


def _sora(params, model_type, *, all_zero=False, rank=4):
  """SoRA on the six dense kernels with random A, B and gates; the i-th module gets i % (rank + 1) zero gates, so
  ranks are mixed and some module has rank 0 (all modules when all_zero)."""
  config = SoraConfig(rank=rank, alpha=8.0, targets=family_module(model_type).TARGETS, stacked=r".*/layer/.*")
  params = init(jax.random.key(0), params, config)
  flat = traverse_util.flatten_dict(params)
  modules = sorted(p[:-1] for p in flat if p[-1] == "sora_a")
  rng = np.random.default_rng(0)
  for i, module in enumerate(modules):
    b = flat[module + ("sora_b",)]
    flat[module + ("sora_b",)] = (0.3 * rng.standard_normal(b.shape)).astype(np.float32)
    gate = rng.uniform(0.5, 1.5, flat[module + ("sora_gate",)].shape) * rng.choice([-1, 1], (rank,))
    zeros = rank if all_zero else i % (rank + 1)
    gate[..., rng.permutation(rank)[:zeros]] = 0.0
    flat[module + ("sora_gate",)] = gate.astype(np.float32)
  return traverse_util.unflatten_dict(flat), config


@pytest.mark.parametrize(
  "model_type, scan_layers", [("bert", False), ("bert", True), ("roberta", False), ("deberta-v2", False)]
)
def test_export_mixed_ranks_matches_peft(checkpoints, tmp_path, model_type, scan_layers):
  directory = checkpoints[model_type]
  pretrained = from_pretrained(directory, scan_layers=scan_layers)
  params, config = _sora(_randomise_head(pretrained.params), model_type)
  ids, mask = _inputs()
  ours = _logits(pretrained.model, params, ids, mask, config)
  merged = _logits(pretrained.model, merge(params, config), ids, mask)

  ranks = save_peft(
    tmp_path, params, config, naming=EncoderNaming(pretrained.config), base_model_name_or_path=directory
  )
  adapter_config = json.loads((tmp_path / "adapter_config.json").read_text())
  assert sorted(set(ranks.values())) == [1, 2, 3, 4]  # mixed ranks; the rank-0 modules are left out
  assert len(ranks) < 12 and len(adapter_config["target_modules"]) == len(ranks)
  assert adapter_config["r"] == adapter_config["lora_alpha"]
  assert adapter_config["rank_pattern"] == adapter_config["alpha_pattern"]

  base = _torch_base(directory)
  with_adapter = peft.PeftModel.from_pretrained(_torch_base(directory), str(tmp_path)).eval()
  for name, module in with_adapter.named_modules():
    if name.removeprefix("base_model.model.") in ranks:
      assert module.r["default"] == ranks[name.removeprefix("base_model.model.")]
      assert module.scaling["default"] == 1.0
  theirs = _torch_logits(with_adapter, ids, mask)
  assert np.abs(ours - _torch_logits(base, ids, mask)).max() > 1e-2  # the adapter and head do something
  np.testing.assert_allclose(theirs, ours, atol=TOL, rtol=0)
  np.testing.assert_allclose(theirs, merged, atol=TOL, rtol=0)

  # Our own reader gives the same function back.
  loaded = load_peft(tmp_path, pretrained.params, EncoderNaming(pretrained.config))
  again = _logits(pretrained.model, loaded.params, ids, mask, loaded.config)
  np.testing.assert_allclose(np.asarray(again), ours, atol=TOL, rtol=0)

  if model_type == "roberta":  # uniform_rank: one rank for every module, zero-padded, the same function
    save_peft(tmp_path / "uniform", params, config, naming=EncoderNaming(pretrained.config), uniform_rank=True)
    uniform = json.loads((tmp_path / "uniform" / "adapter_config.json").read_text())
    assert uniform["r"] == uniform["lora_alpha"] == max(ranks.values()) and not uniform["rank_pattern"]
    padded = peft.PeftModel.from_pretrained(_torch_base(directory), str(tmp_path / "uniform")).eval()
    np.testing.assert_allclose(_torch_logits(padded, ids, mask), ours, atol=TOL, rtol=0)


@pytest.mark.parametrize(
  "model_type, use_rslora, scan_layers",
  [("bert", False, False), ("bert", True, True), ("roberta", False, False), ("deberta-v2", True, False)],
)
def test_import_peft_lora(checkpoints, tmp_path, model_type, use_rslora, scan_layers):
  directory = checkpoints[model_type]
  torch.manual_seed(1)
  lora = peft.LoraConfig(
    r=4,
    lora_alpha=8,
    target_modules=PEFT_TARGETS,
    task_type="SEQ_CLS",
    use_rslora=use_rslora,
    rank_pattern={r"layer.1.intermediate.dense": 2, r"layer\.0\.attention\.self\.\w+": 3},
    alpha_pattern={"output.dense": 5},
  )
  model = peft.get_peft_model(_torch_base(directory), lora).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_B" in name or "modules_to_save" in name:
        p.normal_(0.0, 0.3)
  model.save_pretrained(tmp_path)
  ids, mask = _inputs()
  theirs = _torch_logits(model, ids, mask)

  pretrained = from_pretrained(directory, scan_layers=scan_layers)
  loaded = load_peft(tmp_path, pretrained.params, EncoderNaming(pretrained.config))
  assert sorted(loaded.ranks.values()) == [2] + [3] * 3 + [4] * 8
  ours = np.asarray(_logits(pretrained.model, loaded.params, ids, mask, loaded.config))
  merged = _logits(pretrained.model, merge(loaded.params, loaded.config), ids, mask)
  assert np.abs(theirs - _torch_logits(_torch_base(directory), ids, mask)).max() > 1e-2
  np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)
  np.testing.assert_allclose(merged, theirs, atol=TOL, rtol=0)

  # Continuing with another SoRA config (other scale) keeps the function.
  other = load_peft(
    tmp_path, pretrained.params, EncoderNaming(pretrained.config), config=SoraConfig(rank=8, alpha=32.0)
  )
  again = _logits(pretrained.model, other.params, ids, mask, other.config)
  np.testing.assert_allclose(np.asarray(again), theirs, atol=TOL, rtol=0)


def test_every_module_pruned(checkpoints, tmp_path, caplog):
  directory = checkpoints["bert"]
  pretrained = from_pretrained(directory)
  params, config = _sora(_randomise_head(pretrained.params), "bert", all_zero=True)
  pruned = traverse_util.flatten_dict(prune(params))
  assert all(v.shape[-1] == 0 for p, v in pruned.items() if p[-1] == "sora_a")  # rank 0: zero-size factors
  ids, mask = _inputs()
  ours = _logits(pretrained.model, params, ids, mask, config)

  with caplog.at_level(logging.WARNING, logger="sora_jax.peft"):
    ranks = save_peft(tmp_path, params, config, naming=EncoderNaming(pretrained.config))
  assert ranks == {}
  assert "every SoRA module is pruned" in caplog.text
  adapter_config = json.loads((tmp_path / "adapter_config.json").read_text())
  assert len(adapter_config["target_modules"]) == 1 and adapter_config["modules_to_save"]

  with_adapter = peft.PeftModel.from_pretrained(_torch_base(directory), str(tmp_path)).eval()
  np.testing.assert_allclose(_torch_logits(with_adapter, ids, mask), ours, atol=TOL, rtol=0)
  loaded = load_peft(tmp_path, pretrained.params, EncoderNaming(pretrained.config))
  again = _logits(pretrained.model, loaded.params, ids, mask, loaded.config)
  np.testing.assert_allclose(np.asarray(again), ours, atol=TOL, rtol=0)
  # The modules the adapter leaves out are at rank 0 (zero-size factors), and counted as such.
  report = rank_report(loaded.params, loaded.config)
  assert len(report.rows) == 6 * pretrained.config.num_hidden_layers and report.retained_params == 0


def test_errors(checkpoints, tmp_path):
  bert = from_pretrained(checkpoints["bert"])
  deberta = from_pretrained(checkpoints["deberta-v2"])
  params, config = _sora(bert.params, "bert")
  save_peft(tmp_path, params, config, naming=EncoderNaming(bert.config))

  with pytest.raises(ValueError, match="not dense layers of this deberta-v2 model"):
    load_peft(tmp_path, deberta.params, EncoderNaming(deberta.config))
  with pytest.raises(FileNotFoundError, match="adapter_config.json"):
    load_peft(tmp_path / "missing", bert.params, EncoderNaming(bert.config))
  with pytest.raises(ValueError, match="not supported"):
    save_peft(tmp_path / "gpt", params, config, naming=EncoderNaming(transformers.GPT2Config()))
  with pytest.raises(TypeError, match="naming object, got a transformers config"):
    save_peft(tmp_path / "old", params, config, naming=bert.config)
  with pytest.raises(TypeError, match="replaced by naming="):
    save_peft(tmp_path / "old", params, config, model_config=bert.config)

  fewer_labels = from_pretrained(checkpoints["bert"], num_labels=2)
  with pytest.raises(ValueError, match="num_labels"):
    load_peft(tmp_path, fewer_labels.params, EncoderNaming(fewer_labels.config))

  adapter_config = json.loads((tmp_path / "adapter_config.json").read_text())
  (tmp_path / "adapter_config.json").write_text(json.dumps({**adapter_config, "use_dora": True}))
  with pytest.raises(ValueError, match="use_dora"):
    load_peft(tmp_path, bert.params, EncoderNaming(bert.config))
  (tmp_path / "adapter_config.json").write_text(json.dumps({**adapter_config, "peft_type": "IA3"}))
  with pytest.raises(ValueError, match="only LORA"):
    load_peft(tmp_path, bert.params, EncoderNaming(bert.config))
  with pytest.raises(ValueError, match="would select|modules_to_save"):
    save_peft(
      tmp_path / "overlap",
      params,
      config,
      naming=EncoderNaming(bert.config),
      modules_to_save=(r"bert/encoder/layer_0/attention/",),
    )
