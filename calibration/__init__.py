"""Small calibration samples in the real C4, C-Eval and Alpaca formats, with text of our own.

Shipped in the wheel as `skywork_deploy.calibration`; see README.md here and make_samples.py.
"""
