"""Training package of dicom-node: phantoms, data, U-Net, training, evaluation, export, publish.

Run ``python -m training --help``. The node itself never imports this package (nor torch).
"""

__all__: list[str] = []
