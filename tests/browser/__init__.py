"""Helpers of the real-browser tests: a JupyterLab server and a headless Chromium driven by Playwright."""
