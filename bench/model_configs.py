"""The model shapes and hyperparameters that both sides of the benchmark share (no torch, no jax imported here)."""

# The six dense layers of every encoder block, as PEFT `target_modules` regexes (full match on module names).
TARGET_MODULES = {
  "bert": r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
  r"|intermediate\.dense|output\.dense)",
  "deberta": r".*encoder\.layer\.\d+\.(attention\.self\.(query_proj|key_proj|value_proj)|attention\.output\.dense"
  r"|intermediate\.dense|output\.dense)",
}
RANK = 8
ALPHA = 16.0
LEARNING_RATE = 1e-4
SORA_LAMBDA = 1e-3
# The smoke-test shape of every bench's --tiny: 2 layers, 64 wide (hf_config keywords).
TINY_SHAPE = {"layers": 2, "hidden": 64, "heads": 2, "intermediate": 128, "vocab": 1000}


def hf_config(
  model: str,
  *,
  layers: int = 12,
  hidden: int = 768,
  heads: int = 12,
  intermediate: int = 3072,
  vocab: int | None = None,
  num_labels: int = 2,
):
  """A transformers config of BERT-base or DeBERTa-v3-base shape (smaller with the keyword arguments), dropout off so
  both frameworks time the same arithmetic."""
  from transformers import BertConfig, DebertaV2Config

  common = dict(
    num_hidden_layers=layers,
    hidden_size=hidden,
    num_attention_heads=heads,
    intermediate_size=intermediate,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    num_labels=num_labels,
  )
  if model == "bert":
    return BertConfig(vocab_size=vocab or 30522, **common)
  if model == "deberta":
    # microsoft/deberta-v3-base's config.json, with random weights.
    return DebertaV2Config(
      vocab_size=vocab or 128100,
      hidden_act="gelu",
      max_position_embeddings=512,
      type_vocab_size=0,
      initializer_range=0.02,
      layer_norm_eps=1e-7,
      relative_attention=True,
      max_relative_positions=-1,
      position_buckets=256,
      norm_rel_ebd="layer_norm",
      share_att_key=True,
      pos_att_type=["p2c", "c2p"],
      position_biased_input=False,
      pooler_hidden_size=hidden,
      pooler_dropout=0.0,
      pooler_hidden_act="gelu",
      **common,
    )
  raise ValueError(f"unknown model {model!r}; choose 'bert' or 'deberta'")
