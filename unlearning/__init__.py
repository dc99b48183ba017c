"""Literature baselines and scenario methods, one module per method.

Every module here registers itself in ``methods.METHODS`` with ``@register``. Importing this
package imports them all, so dropping a file in this folder is all it takes to add a method;
code above the methods layer (config, runner) asks this package for the full registry and
calls :func:`unlearn` from here, so every method is registered before one is looked up.
"""

import importlib
import pkgutil

from methods import METHODS, MethodSpec, method_spec, unlearn

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["METHODS", "MethodSpec", "method_spec", "unlearn"]
