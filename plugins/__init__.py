"""Built-in dnsgate plugins. Each sub-package exports one plugin class; see ``engine.plugin_manager``."""
