"""Whether the Hugging Face Hub (or GitHub, or download.pytorch.org) answers from this server: asked once, remembered.

Without this, a server whose network is closed waits on the libraries' own retries before it gets an error: here,
with every name failing to resolve at once, 56 s for the hot dog ViT (huggingface_hub retries each file five times
with 1-8 s back-off, then once more with a 60 s time-out), 23 s for a model card or a LoRA. On a network that drops
or holds connections each try waits out its time-out too, and torch.hub's downloads have none at all. One short
probe per server answers instead; while it says "unreachable" the loaders read local files only, so cached models
still load and missing ones fail at once with a typed error.
"""
from __future__ import annotations

import threading
import time
from urllib.parse import urlsplit

PROBE_TIMEOUT_S = 3.0  # a HEAD to the Hub answers in well under a second where it is reachable at all
REMEMBER_S = 30.0  # long enough that one page's loads, card and LoRA share a probe; short enough to notice recovery


class Reachability:
    """Answers "does this server respond?" per origin (scheme://host:port), remembered for `remember_s`.

    Thread-safe: one probe at a time, and threads asking meanwhile wait for its answer instead of probing too.
    """

    def __init__(self, timeout_s: float = PROBE_TIMEOUT_S, remember_s: float = REMEMBER_S) -> None:
        self.timeout_s = timeout_s
        self.remember_s = remember_s
        self._lock = threading.Lock()
        self._answers: dict[str, tuple[bool, float]] = {}  # origin -> (reachable, time.monotonic() of the probe)

    def reachable(self, url: str) -> bool:
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        with self._lock:
            answer = self._answers.get(origin)
            if answer is None or time.monotonic() - answer[1] >= self.remember_s:
                answer = self._answers[origin] = (self._probe(origin), time.monotonic())
            return answer[0]

    def _probe(self, origin: str) -> bool:
        """Any HTTP answer (even an error status) within the time-out means reachable; no answer means not."""
        from huggingface_hub.utils import get_session  # the Hub client's proxies and certificates, as the loads use

        try:
            get_session().head(origin, timeout=self.timeout_s, follow_redirects=False)
        except Exception:  # noqa: BLE001 - DNS, refused, reset, TLS, time-out: for a probe they all mean "not now"
            return False
        return True


SERVERS = Reachability()  # one per process: every session's loads share its answers


def hub_reachable() -> bool:
    """The Hub endpoint (HF_ENDPOINT) answers; False at once, without a probe, when HF_HUB_OFFLINE is set."""
    from huggingface_hub import constants

    return not constants.HF_HUB_OFFLINE and SERVERS.reachable(constants.ENDPOINT)
