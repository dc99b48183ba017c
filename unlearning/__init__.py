"""Literature baselines and scenario methods, one module per method.

Every module here registers itself in ``methods.METHODS`` with ``@register``; ``methods.py``
imports them all, so dropping a file in this folder is all it takes to add a method.
"""

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")
