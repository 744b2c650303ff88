"""Plain Python under every other layer, importing no JAX: the settings (``config``,
``presets``), their checks (``validate``), the errors and exit codes, and crash-safe files."""
