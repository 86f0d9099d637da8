"""Framework adapters for `pss_cli.guard` (optional extras; docs/GUARD.md).

- `pss_cli.guard.adapters.hf`: Hugging Face `transformers.Trainer` (`pip install
  'pss-checkpoint[hf]'`): `guarded_optimizers(model, args, ...)` for `Trainer(optimizers=...)`,
  plus `GuardCallback` for the Trainer's logs.
- `pss_cli.guard.adapters.lightning`: PyTorch Lightning (`[lightning]`):
  `guarded_optimizers(module, optimizer, scheduler, ...)` for `configure_optimizers`, plus
  `GuardCallback`.
- `pss_cli.guard.adapters.clip`: clipping after the guard's decision, for any loop.

Each module imports its framework at module level; nothing else in pss imports them.
DeepSpeed has no adapter: its engine steps the optimizer inside `engine.step()` before any hook
a guard could use, so a guard can only watch there, never skip (docs/GUARD.md, "DeepSpeed").
"""
