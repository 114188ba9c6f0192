"""Workers with injected faults, for tests. Shipped to Ray by value (see register_pickle_by_value)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ray import cloudpickle

from cogdist.worker import RenderWorker


class PoisonWorker(RenderWorker):
    """Raises for every row whose prompt contains 'poison', as an undecodable input would."""

    def render(self, unit):
        for item in unit.items:
            if "poison" in item.prompt:
                raise ValueError(f"cannot render {item.id}: poisoned prompt")
        return super().render(unit)


def dying_worker(marker_dir: Path, victim: str) -> type:
    """A worker whose process exits hard the first time it renders `victim`."""

    class DyingWorker(RenderWorker):
        def render(self, unit):
            marker = Path(marker_dir) / "died"
            if any(i.id == victim for i in unit.items) and not marker.exists():
                marker.write_text(str(os.getpid()))
                os._exit(1)
            return super().render(unit)

    return DyingWorker


cloudpickle.register_pickle_by_value(sys.modules[__name__])
