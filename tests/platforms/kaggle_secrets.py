"""Stand-in for kaggle_secrets: Kaggle/docker-python's patches/kaggle_secrets.py with the same classes, checks and
messages; the UserSecrets service's answers come from SWEEPER_FAKE_KAGGLE_SECRETS (the attached secrets) and
SWEEPER_FAKE_KAGGLE_INTERNET=off (urlopen fails) instead of an HTTP request."""

import json
import os

_KAGGLE_USER_SECRETS_TOKEN_ENV_VAR_NAME = "KAGGLE_USER_SECRETS_TOKEN"


class CredentialError(Exception):
    pass


class BackendError(Exception):
    pass


class ValidationError(Exception):
    pass


class UserSecretsClient():
    GET_USER_SECRET_BY_LABEL_ENDPOINT = "/requests/GetUserSecretByLabelRequest"

    def __init__(self):
        self.jwt_token = os.getenv(_KAGGLE_USER_SECRETS_TOKEN_ENV_VAR_NAME)
        if self.jwt_token is None:
            raise CredentialError(
                "A JWT Token is required to use the UserSecretsClient, "
                f"but none found in environment variable {_KAGGLE_USER_SECRETS_TOKEN_ENV_VAR_NAME}")

    def _make_post_request(self, data: dict, endpoint: str) -> dict:
        if os.environ.get("SWEEPER_FAKE_KAGGLE_INTERNET") == "off":  # urlopen raised URLError
            raise ConnectionError("Connection error trying to communicate with service.")
        attached = json.loads(os.environ.get("SWEEPER_FAKE_KAGGLE_SECRETS", "{}"))
        if data["Label"] not in attached:  # the service answers wasSuccessful: false
            response_json = {"wasSuccessful": False, "errors": ["No user secrets exist for kernel"]}
            raise BackendError(f"Unexpected response from the service. Response: {response_json}.")
        return {"secret": attached[data["Label"]]}

    def get_secret(self, label) -> str:
        if label is None or len(label) == 0:
            raise ValidationError("Label must be non-empty.")
        response_json = self._make_post_request({"Label": label}, self.GET_USER_SECRET_BY_LABEL_ENDPOINT)
        if "secret" not in response_json:
            raise BackendError(f"Unexpected response from the service. Response: {response_json}")
        return response_json["secret"]
