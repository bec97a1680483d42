"""Where a model comes from (a local folder, or the Hugging Face Hub), checked in one line before anything loads.

Without this, a missing folder surfaces as Hugging Face's "Repo id must be in the form ..." and a Hub id with no
internet as about 50 s of "Retrying in 8s" lines, per worker.
"""

from __future__ import annotations

import os
from pathlib import Path

from sweeper.errors import SweeperError, UserError, first_line

NO_INTERNET = "no internet: enable it (on Kaggle: Settings > Internet) or point model.id at a local copy"


def check_model_source(model_id: str) -> None:
    """A folder that exists, a Hub id already in the local cache, or a Hub id the Hub answers for (one request)."""
    if Path(model_id).expanduser().is_dir():
        return
    if model_id.startswith(("/", "./", "../", "~")) or model_id.count("/") > 1:
        raise UserError(f"model.id {model_id!r} is a path, and there is no folder there")
    from huggingface_hub import model_info, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(model_id, "config.json"), str):
        return  # downloaded before: loading needs no network
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise SweeperError(f"model {model_id!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set")
    try:
        model_info(model_id, timeout=15)
    except GatedRepoError:
        raise SweeperError(f"model {model_id!r} is gated on the Hugging Face Hub: accept its terms on its page and "
                           "set HF_TOKEN (a Colab or Kaggle secret)") from None
    except RepositoryNotFoundError:
        raise SweeperError(f"no model {model_id!r} on the Hugging Face Hub (or it is private: set HF_TOKEN)") from None
    except Exception as e:  # noqa: BLE001  the HTTP stack differs by version: requests, httpx
        if _is_network_error(e):
            raise SweeperError(f"cannot download model {model_id!r} from the Hugging Face Hub: {NO_INTERNET}") from None
        # Anything else (a 429, a 5xx): let the download itself try, with its own retries.


def cannot_load(what: str, model_id: str, error: Exception) -> SweeperError:
    return SweeperError(f"cannot load the {what} of {model_id!r}: {first_line(error)}")


def _is_network_error(error: Exception) -> bool:
    # requests' ConnectionError and Timeout are OSErrors; httpx's ConnectError, ConnectTimeout and ReadTimeout are not.
    name = type(error).__name__
    return isinstance(error, OSError) or "Connect" in name or "Timeout" in name
