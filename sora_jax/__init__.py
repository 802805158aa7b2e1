"""sora_jax: SoRA (sparse low-rank adaptation) for JAX, Flax and Optax."""

from sora_jax.adapters import RankReport as RankReport
from sora_jax.adapters import RankRow as RankRow
from sora_jax.adapters import SoraConfig as SoraConfig
from sora_jax.adapters import adapter_mask as adapter_mask
from sora_jax.adapters import combine as combine
from sora_jax.adapters import gate_mask as gate_mask
from sora_jax.adapters import init as init
from sora_jax.adapters import merge as merge
from sora_jax.adapters import not_gate_mask as not_gate_mask
from sora_jax.adapters import param_labels as param_labels
from sora_jax.adapters import prune as prune
from sora_jax.adapters import rank_report as rank_report
from sora_jax.adapters import split as split
from sora_jax.adapters import unmerge as unmerge
from sora_jax.budget import BudgetCut as BudgetCut
from sora_jax.budget import SoraBudgetState as SoraBudgetState
from sora_jax.budget import adapter_params as adapter_params
from sora_jax.budget import budget_phases as budget_phases
from sora_jax.budget import budget_schedule as budget_schedule
from sora_jax.budget import cut_to_budget as cut_to_budget
from sora_jax.budget import smallest_rank_params as smallest_rank_params
from sora_jax.budget import retained_fraction as retained_fraction
from sora_jax.budget import sora_budget as sora_budget
from sora_jax.forward import apply_factored as apply_factored
from sora_jax.forward import factored as factored
from sora_jax.forward import low_rank_product as low_rank_product
from sora_jax.layout import RankCost as RankCost
from sora_jax.layout import rank_cost as rank_cost
from sora_jax.leaves import SoraAxes as SoraAxes
from sora_jax.leaves import SoraGate as SoraGate
from sora_jax.optim import SoraProximalState as SoraProximalState
from sora_jax.optim import gate_l1_penalty as gate_l1_penalty
from sora_jax.gate_step import soft_threshold as soft_threshold
from sora_jax.optim import sora_proximal as sora_proximal
from sora_jax.recipe import sora_optimizer as sora_optimizer
from sora_jax.peft import LoadedPeft as LoadedPeft
from sora_jax.peft_load import load_peft as load_peft
from sora_jax.peft import PeftNaming as PeftNaming
from sora_jax.peft import save_merged as save_merged
from sora_jax.peft import save_peft as save_peft
from sora_jax.provider import SoraProvider as SoraProvider
from sora_jax.provider import SoraRule as SoraRule
from sora_jax.provider import apply_sora as apply_sora
from sora_jax.schedules import LAMBDA_SHAPES as LAMBDA_SHAPES
from sora_jax.schedules import lambda_schedule as lambda_schedule
from sora_jax.schedules import lambda_stages as lambda_stages
from sora_jax.truncate import TruncateReport as TruncateReport
from sora_jax.truncate import truncate as truncate

__all__ = [
  "BudgetCut",
  "LAMBDA_SHAPES",
  "LoadedPeft",
  "PeftNaming",
  "RankCost",
  "RankReport",
  "RankRow",
  "SoraBudgetState",
  "SoraAxes",
  "SoraConfig",
  "SoraGate",
  "SoraProvider",
  "SoraProximalState",
  "SoraRule",
  "TruncateReport",
  "adapter_mask",
  "adapter_params",
  "apply_factored",
  "apply_sora",
  "budget_phases",
  "budget_schedule",
  "combine",
  "cut_to_budget",
  "factored",
  "gate_l1_penalty",
  "gate_mask",
  "init",
  "lambda_schedule",
  "lambda_stages",
  "load_peft",
  "low_rank_product",
  "merge",
  "not_gate_mask",
  "param_labels",
  "prune",
  "rank_cost",
  "rank_report",
  "retained_fraction",
  "save_merged",
  "save_peft",
  "smallest_rank_params",
  "soft_threshold",
  "sora_budget",
  "sora_optimizer",
  "sora_proximal",
  "split",
  "truncate",
  "unmerge",
]
