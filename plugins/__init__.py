"""Built-in dnsgate plugins. Each sub-package exports one plugin class; see ``engine.plugin_manager``."""

import engine  # noqa: F401  (installs the compiled build's import hook before a plugin module loads)
