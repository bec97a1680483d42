"""Stand-in for google.colab.errors: the same classes as colabtools' google/colab/errors.py."""


class Error(Exception):
    """Base class for all Colab errors."""


class AuthorizationError(Error):
    """Authorization-related failures."""
