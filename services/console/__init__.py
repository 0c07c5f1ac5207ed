"""The operator console (`meterline console`): the admin JSON API under /admin/v1/ and the
server-rendered web console at /, both calling the same service functions as the CLI."""
