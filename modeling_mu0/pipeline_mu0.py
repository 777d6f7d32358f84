"""`pipeline("trace-prediction")`: one image, an instruction and query points in, future traces out.

Saved beside every μ0 checkpoint (it needs only numpy, torch and transformers), so
`pipeline("trace-prediction", model=repo, trust_remote_code=True)` works where mu0 is not installed; with mu0
imported the task is also registered for models built in code.
"""

import numpy as np
import torch
from transformers import Pipeline

TASK = "trace-prediction"


class Mu0TracePredictionPipeline(Pipeline):
    """Predicts the future trace of every query point with [`Mu0ForTracePrediction`] and its [`Mu0Processor`].

    ```python
    from transformers import pipeline

    predictor = pipeline("trace-prediction", model="user/mu0", trust_remote_code=True)
    result = predictor(image, text="push the red block left", query_points=[[120, 80], [200, 95]], num_samples=5)
    result["pixels"]  # (samples, points, horizon, 2) pixel positions; result["alive"] where the trace goes on
    ```

    Inputs: an image (or a dict with `image`, `text`, `query_points` and optional `depth`, `intrinsics`), query
    points as (N, 2) pixels or (N, 3) with each point's current metric depth. With depth, `uvz` holds (u, v, z)
    and, with intrinsics (3, 3), `xyz` the metric camera-frame points.
    """

    _load_processor = True
    _load_image_processor = False
    _load_tokenizer = False
    _load_feature_extractor = False

    def _sanitize_parameters(
        self, text=None, query_points=None, depth=None, intrinsics=None, num_samples=None, num_steps=None, seed=None,
        **kwargs,
    ):
        if kwargs:
            raise ValueError(f"The trace-prediction pipeline does not take {sorted(kwargs)}.")
        preprocess = {"text": text, "query_points": query_points, "depth": depth, "intrinsics": intrinsics}
        forward = {"num_samples": num_samples, "num_steps": num_steps, "seed": seed}
        return (
            {key: value for key, value in preprocess.items() if value is not None},
            {key: value for key, value in forward.items() if value is not None},
            {},
        )

    def preprocess(self, image, text=None, query_points=None, depth=None, intrinsics=None) -> dict:
        if isinstance(image, dict):
            fields = {"text": text, "query_points": query_points, "depth": depth, "intrinsics": intrinsics, **image}
            image, text, query_points = fields.pop("image", None), fields["text"], fields["query_points"]
            depth, intrinsics = fields["depth"], fields["intrinsics"]
        if image is None or query_points is None:
            raise ValueError("The trace-prediction pipeline needs an image and `query_points` ((N, 2) pixels).")
        if depth is not None and not self.model.config.use_depth:
            raise ValueError("This model was built without depth (use_depth=False): do not pass `depth`.")
        inputs = dict(self.processor(
            images=[image], text=text, query_points=[np.asarray(query_points, dtype=np.float64)],
            depth=None if depth is None else [np.asarray(depth)],
        ))
        inputs["intrinsics"] = None if intrinsics is None else torch.as_tensor(intrinsics, dtype=torch.float32)[None]
        return inputs

    def _forward(self, inputs: dict, num_samples: int = 1, num_steps: int | None = None, seed: int | None = None) -> dict:
        generator = None if seed is None else torch.Generator(device=self.device).manual_seed(seed)
        prediction = self.model.predict_traces(**inputs, num_samples=num_samples, num_steps=num_steps, generator=generator)
        return {"prediction": prediction, "inputs": inputs}

    def postprocess(self, outputs: dict) -> dict:
        prediction, inputs = outputs["prediction"], outputs["inputs"]
        traces = self.processor.post_process_traces(
            prediction.traces, inputs["query_points"], inputs["image_sizes"], inputs.get("query_depth"),
            inputs["intrinsics"],
        )
        result = {name: values[0].cpu() for name, values in traces.items()}
        result["alive"] = prediction.alive_mask[0].cpu()
        result["done_probs"] = prediction.done_probs[0].cpu()
        return result


__all__ = ["TASK", "Mu0TracePredictionPipeline"]
