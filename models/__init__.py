"""Model specs -> Hugging Face models: building, initialization, μP, parameter and FLOP counting.

`oneday.models.spec` is pure Python (no torch), so the planner and the plan schema can use it freely;
`oneday.models.build` imports torch and transformers.
"""

from oneday.models.spec import ModelSpec

__all__ = ["ModelSpec"]
