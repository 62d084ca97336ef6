"""The "models from code" file MLflow logs for every aigc model (see ``aigc.registry.pyfunc``).

Not imported as a module: MLflow runs it when it loads the model, and ``set_model`` is the point.
"""

import mlflow.models

from aigc.registry.pyfunc import GenModel

mlflow.models.set_model(GenModel())
