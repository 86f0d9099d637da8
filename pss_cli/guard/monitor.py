"""The spectral monitor: sigma_1 and ||W||_F of a few matrices per check, round-robin.

Every `check_every` steps it measures the next `matrices_per_check` matrices (in parameter
order, wrapping around), so no step pays for all of them: sigma_1 by warm-started power
iteration (pss_cli.core.power; the right vectors persist in the guard's state), ||W||_F exactly.
The results stay on the device: the guard reads them together with the step's other scalars in
its one host synchronisation. Sharded (DTensor) weights are gathered with `full_tensor()` one
matrix at a time, never all at once.
"""

from __future__ import annotations

from typing import Any

import torch

from pss_cli.core.power import frobenius_norm_sq, power_step, random_unit_vector
from pss_cli.guard.targets import MatrixSpec, full_value


class SpectralMonitor:
    def __init__(
        self,
        specs: list[MatrixSpec],
        check_every: int,
        matrices_per_check: int,
        power_iters: int,
        first_power_iters: int,
        generator: torch.Generator,
    ) -> None:
        self.specs = specs
        self.check_every = check_every
        self.requested_per_check = matrices_per_check
        self.matrices_per_check = min(matrices_per_check, len(specs))
        self.power_iters = power_iters
        self.first_power_iters = first_power_iters
        self.generator = generator
        self.cursor = 0
        # Per matrix: the persistent right singular vector estimate (n,), float32 (float64 for
        # float64 weights), on the weight's device; None until its first visit.
        self.vectors: list[torch.Tensor | None] = [None] * len(specs)
        # Vectors of the last load_state_dict, by matrix name (set_specs looks them up).
        self._loaded: dict[str, torch.Tensor] = {}

    def set_specs(self, specs: list[MatrixSpec]) -> None:
        """Monitor these matrices from now on (the trainable set changed): a matrix that stays
        keeps its vector; the cursor keeps its place in the round-robin."""
        # In memory, else as loaded by load_state_dict (a resumed run whose trainable set
        # changes after the load keeps the saved vectors, as the uninterrupted run did).
        kept = {name: v.to(self._device_of(specs, name)) for name, v in self._loaded.items()}
        kept.update(
            (spec.name, vector)
            for spec, vector in zip(self.specs, self.vectors, strict=True)
            if vector is not None
        )
        self.vectors = [
            kept[s.name] if s.name in kept and kept[s.name].shape == (s.shape[1],) else None
            for s in specs
        ]
        self.specs = specs
        self.matrices_per_check = min(self.requested_per_check, len(specs))
        self.cursor = self.cursor % max(1, len(specs))

    def due(self, step: int) -> bool:
        return self.check_every > 0 and self.matrices_per_check > 0 and step % self.check_every == 0

    def next_indices(self) -> list[int]:
        count = len(self.specs)
        return [(self.cursor + i) % count for i in range(self.matrices_per_check)]

    @torch.no_grad()
    def measure(self, indices: list[int], device: torch.device) -> torch.Tensor:
        """(2 * len(indices),) [sigma_1..., ||W||_F^2...] float64 on `device`; advances the cursor.

        Reads the weights only; its random start vectors come from the monitor's own generator.
        """
        sigmas: list[torch.Tensor] = []
        frobs: list[torch.Tensor] = []
        for index in indices:
            spec = self.specs[index]
            matrix = spec.view(full_value(spec.param.detach()))
            vector = self.vectors[index]
            n_iters = self.power_iters
            if vector is None:
                dtype = torch.float64 if matrix.dtype == torch.float64 else torch.float32
                vector = random_unit_vector(matrix.shape[1], self.generator, dtype).to(
                    matrix.device
                )
                n_iters = max(self.first_power_iters, 1)
            sigma, vector = power_step(matrix, vector, n_iters)
            self.vectors[index] = vector
            sigmas.append(sigma.to(device=device, dtype=torch.float64))
            frobs.append(frobenius_norm_sq(matrix).to(device=device))
        self.cursor = (self.cursor + len(indices)) % max(1, len(self.specs))
        return torch.stack(sigmas + frobs)

    def state_dict(self) -> dict[str, Any]:
        return {
            "cursor": self.cursor,
            "vectors": {
                spec.name: vector.detach().to("cpu")
                for spec, vector in zip(self.specs, self.vectors, strict=True)
                if vector is not None
            },
        }

    @staticmethod
    def _device_of(specs: list[MatrixSpec], name: str) -> torch.device:
        return next((s.param.device for s in specs if s.name == name), torch.device("cpu"))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Not reduced here: the specs of a resumed guard may still change (set_specs) before
        # the round-robin reads it (next_indices takes it modulo the count then).
        self.cursor = int(state.get("cursor", 0))
        vectors = state.get("vectors", {})
        self._loaded = {
            name: v
            for name, v in vectors.items()
            if isinstance(v, torch.Tensor) and v.ndim == 1 and bool(v.abs().amax() > 0)
        }
        for i, spec in enumerate(self.specs):
            saved = vectors.get(spec.name)
            # A zero vector (saved by a version whose power step returned one for an all-zero
            # matrix) would never move again: a fresh random start instead.
            if (
                saved is not None
                and saved.shape == (spec.shape[1],)
                and bool(saved.abs().amax() > 0)
            ):
                self.vectors[i] = saved.to(spec.param.device)
            else:
                self.vectors[i] = None
