"""Built-in domains. Each subpackage is imported only when its domain is asked for."""
