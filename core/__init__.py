"""flowcoach.core: the domain-agnostic part (policies, samplers, advantages, losses, trainer).

Importing it registers the built-in noise laws, advantage estimators and algorithm recipes; it
never imports a domain's libraries (or diffusers: time grids and EMA import it when used).
"""

from flowcoach.core import advantages, algorithms  # noqa: F401 - register built-ins
from flowcoach.core.registry import FlowcoachError  # noqa: F401
from flowcoach.core.sampling import laws  # noqa: F401
