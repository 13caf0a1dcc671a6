# Stand-in for hashicorp/http-echo (tests only: no registry is reachable).
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
COPY http_echo.py /http-echo.py
USER 65532:65532
ENTRYPOINT ["python3", "/http-echo.py"]
