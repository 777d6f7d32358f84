"""MetaWorld demonstrations and policy rollouts, rendered offscreen with MuJoCo.

The recorder runs MetaWorld's bundled scripted expert of each task from MT1's fixed start states and writes
(a) a LeRobotDataset v3 folder (third-person RGB, end-effector state, actions, task text) for action-expert training,
with per-episode success and camera matrices in `meta/metaworld.json`, and (b) the same episodes as RGB-D `.npz`
files (metric depth, intrinsics, world→camera extrinsics) that TraceExtract's `rgbd` source turns into action-free
trace data for μ0. Needs the `sim` extra (`pip install "mu0[sim]"`) and `MUJOCO_GL=egl` for offscreen rendering.
"""

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

STATE_SIZE = 4  # end-effector xyz and gripper opening: the first four entries of a MetaWorld observation
ACTION_SIZE = 4
METAWORLD_META_PATH = "meta/metaworld.json"
# MetaWorld's corner cameras are mounted upside down: their images are turned 180° (and their extrinsics with them).
UPSIDE_DOWN_CAMERAS = ("corner", "corner2", "corner3", "corner4")
_OPENGL_TO_OPENCV = np.diag([1.0, -1.0, -1.0])
_HALF_TURN = np.diag([-1.0, -1.0, 1.0])


def _import_metaworld():
    os.environ.setdefault("MUJOCO_GL", "egl")
    try:
        import metaworld
        import metaworld.policies
        import mujoco
    except ImportError as error:
        raise ImportError(
            f"MetaWorld recording needs `metaworld` and `mujoco` ({error}): pip install \"mu0[sim]\"."
        ) from error
    return metaworld, mujoco


def task_instruction(task_name: str) -> str:
    """MetaWorld's only language is the task name: `button-press-topdown-v3` → `button press topdown`."""
    return task_name.rsplit("-v", 1)[0].replace("-", " ")


def scripted_policy(task_name: str):
    """The bundled expert of a task: `pick-place-v3` → `metaworld.policies.SawyerPickPlaceV3Policy`."""
    metaworld, _ = _import_metaworld()
    base, version = task_name.rsplit("-v", 1)
    class_name = "Sawyer" + "".join(part.capitalize() for part in base.split("-")) + f"V{version}Policy"
    if not hasattr(metaworld.policies, class_name):
        raise ValueError(f"MetaWorld has no scripted policy {class_name} for task {task_name!r}.")
    return getattr(metaworld.policies, class_name)()


def scripted_actor(scene: "MetaWorldScene") -> Callable[[np.ndarray, np.ndarray, str], np.ndarray]:
    """The bundled expert as a `rollout` policy: a reference for the success-rate harness itself.

    It reads the scene's full last observation (object poses), which `rollout` does not pass to learned policies.
    """
    expert = scripted_policy(scene.task_name)

    def act(frame: np.ndarray, state: np.ndarray, instruction: str) -> np.ndarray:
        return np.clip(expert.get_action(scene.observation), -1.0, 1.0)[None]

    return act


@dataclass
class MetaWorldEpisode:
    task_name: str
    start_index: int  # which of MT1's 50 fixed start states
    frames: np.ndarray  # (T, H, W, 3) uint8
    depth: np.ndarray | None  # (T, H, W) metres
    states: np.ndarray  # (T, 4)
    actions: np.ndarray  # (T, 4)
    successes: np.ndarray  # (T,) bool, info["success"] after each action
    intrinsics: np.ndarray  # (3, 3)
    extrinsics: np.ndarray  # (4, 4) world -> camera (the camera is fixed)

    @property
    def succeeded(self) -> bool:
        return bool(self.successes.any())


class MetaWorldScene:
    """One MT1 task with an offscreen camera: reset to a start state, step, and render RGB (and metric depth)."""

    def __init__(self, task_name: str, image_size: int = 128, camera: str = "corner", seed: int = 0):
        metaworld, mujoco = _import_metaworld()
        if task_name not in metaworld.ALL_V3_ENVIRONMENTS:
            raise ValueError(
                f"Unknown MetaWorld task {task_name!r}; choose one of {sorted(metaworld.ALL_V3_ENVIRONMENTS)[:5]}… "
                "(`metaworld.ALL_V3_ENVIRONMENTS`)."
            )
        self._mujoco = mujoco
        self.task_name = task_name
        self.benchmark = metaworld.MT1(task_name, seed=seed)
        self.env = self.benchmark.train_classes[task_name]()
        self.env.set_task(self.benchmark.train_tasks[0])
        model = self.env.model
        names = [model.camera(index).name for index in range(model.ncam)]
        if camera not in names:
            raise ValueError(f"MetaWorld has no camera {camera!r}; choose one of {names}.")
        self.camera = camera
        self.image_size = image_size
        self.renderer = mujoco.Renderer(model, image_size, image_size)
        # Shadows and reflections cost ~5x the render time and carry nothing the models use.
        self.renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = False
        self.renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = False
        self._flip = camera in UPSIDE_DOWN_CAMERAS
        self.observation: np.ndarray | None = None  # the last one `reset` or `step` returned

    @property
    def num_start_states(self) -> int:
        return len(self.benchmark.train_tasks)

    def reset(self, start_index: int) -> np.ndarray:
        self.env.set_task(self.benchmark.train_tasks[start_index % self.num_start_states])
        self.observation, _ = self.env.reset()
        return self.observation

    def step(self, action: np.ndarray) -> tuple[np.ndarray, bool]:
        self.observation, _, _, _, info = self.env.step(np.clip(action, -1.0, 1.0))
        return self.observation, bool(info["success"])

    def render(self, with_depth: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        self.renderer.update_scene(self.env.data, camera=self.camera)
        rgb = self.renderer.render().copy()
        depth = None
        if with_depth:
            self.renderer.enable_depth_rendering()
            self.renderer.update_scene(self.env.data, camera=self.camera)
            depth = self.renderer.render().astype(np.float32)
            self.renderer.disable_depth_rendering()
        if self._flip:
            rgb = np.ascontiguousarray(rgb[::-1, ::-1])
            depth = None if depth is None else np.ascontiguousarray(depth[::-1, ::-1])
        return rgb, depth

    def camera_matrices(self) -> tuple[np.ndarray, np.ndarray]:
        """Intrinsics (OpenCV pixels, centres at integers) and world→camera extrinsics in OpenCV axes."""
        model, data = self.env.model, self.env.data
        camera_id = model.camera(self.camera).id
        focal = 0.5 * self.image_size / np.tan(np.deg2rad(model.cam_fovy[camera_id]) / 2)
        centre = (self.image_size - 1) / 2
        intrinsics = np.array([[focal, 0.0, centre], [0.0, focal, centre], [0.0, 0.0, 1.0]])
        rotation = _OPENGL_TO_OPENCV @ data.cam_xmat[camera_id].reshape(3, 3).T
        if self._flip:
            rotation = _HALF_TURN @ rotation
        extrinsics = np.eye(4)
        extrinsics[:3, :3] = rotation
        extrinsics[:3, 3] = -rotation @ data.cam_xpos[camera_id]
        return intrinsics, extrinsics

    def close(self) -> None:
        self.renderer.close()
        self.env.close()


@contextmanager
def metaworld_scene(task_name: str, image_size: int = 128, camera: str = "corner", seed: int = 0) -> Iterator[MetaWorldScene]:
    scene = MetaWorldScene(task_name, image_size, camera, seed)
    try:
        yield scene
    finally:
        scene.close()


def record_episode(scene: MetaWorldScene, start_index: int, max_steps: int = 200, with_depth: bool = True,
                   settle_steps: int = 5) -> MetaWorldEpisode:
    """Run the scripted expert from one start state; stop `settle_steps` after the first success or at `max_steps`."""
    policy = scripted_policy(scene.task_name)
    observation = scene.reset(start_index)
    frames, depths, states, actions, successes = [], [], [], [], []
    remaining = None
    for _ in range(max_steps):
        rgb, depth = scene.render(with_depth)
        action = np.clip(policy.get_action(observation), -1.0, 1.0)
        frames.append(rgb)
        depths.append(depth)
        states.append(observation[:STATE_SIZE])
        actions.append(action)
        observation, success = scene.step(action)
        successes.append(success)
        if success and remaining is None:
            remaining = settle_steps
        if remaining is not None:
            remaining -= 1
            if remaining < 0:
                break
    intrinsics, extrinsics = scene.camera_matrices()
    return MetaWorldEpisode(
        task_name=scene.task_name,
        start_index=start_index,
        frames=np.stack(frames),
        depth=np.stack(depths) if with_depth else None,
        states=np.asarray(states, dtype=np.float32),
        actions=np.asarray(actions, dtype=np.float32),
        successes=np.asarray(successes, dtype=bool),
        intrinsics=intrinsics,
        extrinsics=extrinsics,
    )


def record_metaworld(
    task_names: list[str],
    start_indices: list[int],
    image_size: int = 128,
    camera: str = "corner",
    max_steps: int = 200,
    with_depth: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> list[MetaWorldEpisode]:
    """Scripted demonstrations of every task from each of `start_indices` (MT1's fixed start states)."""
    from tqdm.auto import tqdm

    episodes = []
    bar = tqdm(total=len(task_names) * len(start_indices), desc="recording MetaWorld", unit="episode", disable=not progress)
    for task_name in task_names:
        with metaworld_scene(task_name, image_size, camera, seed) as scene:
            for start_index in start_indices:
                episodes.append(record_episode(scene, start_index, max_steps, with_depth))
                bar.update()
    bar.close()
    return episodes


def write_metaworld_lerobot(root: str, episodes: list[MetaWorldEpisode], fps: float = 80.0) -> None:
    """The episodes as a LeRobotDataset v3 folder, with success flags and cameras in `meta/metaworld.json`."""
    from .robot_sources import write_lerobot_episodes

    write_lerobot_episodes(
        root,
        [{"frames": e.frames, "states": e.states, "actions": e.actions, "task": task_instruction(e.task_name)}
         for e in episodes],
        fps=fps,
    )
    meta = [
        {"episode_index": index, "task_name": e.task_name, "start_index": e.start_index, "success": e.succeeded,
         "successes": e.successes.tolist(), "intrinsics": e.intrinsics.tolist(), "extrinsics": e.extrinsics.tolist()}
        for index, e in enumerate(episodes)
    ]
    path = os.path.join(root, METAWORLD_META_PATH)
    with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(path), delete=False, suffix=".tmp") as handle:
        json.dump(meta, handle)
    os.replace(handle.name, path)


def write_metaworld_rgbd(directory: str, episodes: list[MetaWorldEpisode], fps: float = 80.0) -> list[str]:
    """One `.npz` per episode for TraceExtract's `rgbd` source (written to a temp name, then renamed)."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for e in episodes:
        if e.depth is None:
            raise ValueError(f"Episode {e.task_name}/{e.start_index} was recorded without depth (with_depth=False).")
        path = os.path.join(directory, f"{e.task_name}-{e.start_index:03d}.npz")
        temporary = path + ".tmp.npz"
        np.savez_compressed(
            temporary, frames=e.frames, depth=e.depth, intrinsics=e.intrinsics,
            extrinsics=np.repeat(e.extrinsics[None], len(e.frames), axis=0), task=task_instruction(e.task_name), fps=fps,
        )
        os.replace(temporary, path)
        paths.append(path)
    return paths


def rollout(
    act: Callable[[np.ndarray, np.ndarray, str], np.ndarray],
    scene: MetaWorldScene,
    start_index: int,
    max_steps: int = 200,
    num_execute_steps: int = 8,
) -> bool:
    """Run a chunked policy `act(frame, state, instruction) -> (chunk, 4) actions` from one start state; True on success.

    The first `num_execute_steps` actions of every chunk are executed before the policy is queried again.
    """
    observation = scene.reset(start_index)
    instruction = task_instruction(scene.task_name)
    steps = 0
    while steps < max_steps:
        frame, _ = scene.render(with_depth=False)
        chunk = np.asarray(act(frame, observation[:STATE_SIZE], instruction))
        if chunk.ndim != 2 or chunk.shape[1] != ACTION_SIZE:
            raise ValueError(f"The policy returned actions of shape {chunk.shape}; MetaWorld needs (chunk, {ACTION_SIZE}).")
        for action in chunk[:num_execute_steps]:
            observation, success = scene.step(action)
            steps += 1
            if success:
                return True
            if steps >= max_steps:
                break
    return False


__all__ = [
    "MetaWorldEpisode",
    "MetaWorldScene",
    "metaworld_scene",
    "record_episode",
    "record_metaworld",
    "rollout",
    "scripted_actor",
    "scripted_policy",
    "task_instruction",
    "write_metaworld_lerobot",
    "write_metaworld_rgbd",
]
