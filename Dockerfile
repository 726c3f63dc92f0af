# The dashboard as one image: a Hugging Face Docker Space as it is (README front matter), or a team server
# (docs/DEPLOY.md). torch from PyPI brings its own CUDA libraries: a GPU host needs only the driver, and with no
# GPU the app runs on the CPU and says so on Home.
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Spaces run the container as uid 1000; the same user everywhere keeps file ownership in /data consistent.
RUN useradd --create-home --uid 1000 user

WORKDIR /home/user/app
# Requirements first: code edits then rebuild only the last layers, not the 3 GB of torch and CUDA.
COPY requirements.txt .
RUN pip install -r requirements.txt

# The code stays owned by root, so the app cannot rewrite itself.
COPY . .

# Model caches and stand-ins live in /data: a Space's persistent storage mounts there, a server mounts a volume
# (docker run -v ...:/data). Without one, the anonymous volume still keeps downloads out of the image layers.
RUN mkdir -p /data && chown user:user /data
VOLUME /data
ENV HF_HOME=/data/huggingface \
    TORCH_HOME=/data/torch \
    DASH_STANDIN_DIR=/data/standins \
    DASH_COMPILE_CACHE=/data/inductor \
    DASH_HISTORY_DIR=/data/history \
    HF_HUB_DISABLE_TELEMETRY=1

# Only for the Space: its proxy makes uploads fail the XSRF check (403), so this image turns the check off.
# .streamlit/config.toml keeps it on; a team server turns it back on (docs/DEPLOY.md), as these are plain variables.
ENV STREAMLIT_SERVER_ENABLE_XSRF_PROTECTION=false \
    STREAMLIT_SERVER_ENABLE_CORS=false

USER user
EXPOSE 8501
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8501/_stcore/health', timeout=4)"]
# A Space with `hf_oauth: true` gets its login ([auth] in the user's secrets.toml) written from the Space's OAuth
# variables before Streamlit reads its secrets; the entry point then becomes the CMD (exec), elsewhere it only execs.
ENTRYPOINT ["python", "-m", "core.access", "/home/user/.streamlit/secrets.toml", "--"]
# As `make run` starts it, with the project's .streamlit/config.toml, listening beyond the container.
CMD ["streamlit", "run", "Home.py", "--server.port", "8501", "--server.address", "0.0.0.0"]
