"""MuJoCo tabletop episodes with exact 3D ground truth, filmed by a real rasteriser.

The numpy `procedural` source is exact but draws only yawed boxes with its own shading. This source builds an MJCF
scene per seed (a textured table, boxes and cylinders, a drawer cabinet, a palm-and-two-finger gripper), poses every
body kinematically (no physics, so motion is exactly what the script says) and films it with `mujoco.Renderer`:
perspective, lighting and textures come from OpenGL, while depth, cameras and tracks stay exact. An object held by
the gripper is posed with it, so it moves rigidly with the hand.

Conventions are the procedural source's, and so are the camera path, the motion profiles and the visibility test:
the table is the plane z = 0 with z up, the camera sits at -y looking towards +y, cameras use OpenCV axes (x right,
y down, z forward) with `extrinsics` world -> camera, depth is the z coordinate in the camera frame, and pixel
(row i, column j) has its centre at (u, v) = (j, i).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from .procedural import (
    _APPROACH_END,
    _FIELD_OF_VIEW_DEG,
    _GRIPPER_HOVER,
    _PUSH_DIRECTIONS,
    _RETREAT_START,
    BLOCK_COLORS,
    GRIPPER_COLOR,
    TABLE_COLORS,
    ProceduralEpisode,
    _camera_path,
    _carry_path,
    _draw,
    _ease,
    _visibility,
    _yaw_rotations,
    project_points,
)

SKILLS = ("push", "pick_place", "stack", "open", "close")
CAMERA_NAME = "view"
DRAWER_JOINT = "drawer"

_TABLE_SAMPLE_REGION = ((-0.26, 0.26), (-0.16, 0.3))  # x, y range of candidate table points: the visible table
_POINT_DENSITY = 1.5e5  # candidate surface points per square metre, before the frame-0 visibility test
_FINGER_HALF = (0.004, 0.01)  # finger half thickness (across the grasp) and half width
_PALM_HALF_Z = 0.007
_GAP = 0.003  # between a finger and what it grasps or pushes
_HANDLE_HALF = 0.004  # half thickness of the drawer's handle bar
_HANDLE_STANDOFF = 0.02  # from the drawer front to the handle bar, room for a finger
_CABINET_WALL = 0.005
_MIN_VISIBLE_PER_MOVING_BODY = 4
_MAX_LAYOUT_ATTEMPTS = 100


@dataclass
class MujocoEpisode(ProceduralEpisode):
    """A `ProceduralEpisode` (same fields, same meaning) plus what replays it in MuJoCo.

    Attributes:
        qpos: (T, nq) float64 joint positions per frame: free joints of the objects and gripper, the drawer's slide.
        mjcf: the scene; `mujoco.MjModel.from_xml_string(mjcf)` posed with `qpos` reproduces every frame.
    """

    qpos: np.ndarray
    mjcf: str


@dataclass
class _Body:
    """One body of the scene: its MJCF geoms (relative to the body) and its motion.

    `joint` is "free" (`motion` is (T, 4): x, y, z, yaw), "slide" (a drawer: `motion` is (T, 1), the opening in
    metres towards -y) or None (static at `position`). `touches` names the bodies it may overlap by design.
    """

    name: str  # also its name in instructions, e.g. "red block"
    geoms: str
    joint: str | None
    motion: np.ndarray
    position: tuple[float, float, float] = (0.0, 0.0, 0.0)
    moving: bool = False
    touches: tuple[str, ...] = ()
    children: tuple[_Body, ...] = ()

    @property
    def key(self) -> str:
        return self.name.replace(" ", "_")

    def qpos(self) -> np.ndarray:
        """(T, nq of this joint): position and yaw quaternion (w, x, y, z) of a free joint, or the slide opening."""
        if self.joint != "free":
            return self.motion
        half_yaw = self.motion[:, 3] / 2
        zeros = np.zeros_like(half_yaw)
        return np.column_stack([self.motion[:, :3], np.cos(half_yaw), zeros, zeros, np.sin(half_yaw)])


def import_mujoco():
    """Import MuJoCo for offscreen rendering (EGL unless MUJOCO_GL already says otherwise), or say how to install it."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    try:
        import mujoco
    except ImportError as error:
        raise ImportError('The "mujoco" episode source needs MuJoCo: pip install "mu0[sim]" (mujoco>=3.2).') from error
    return mujoco


def camera_intrinsics(fovy_degrees: float, height: int, width: int) -> np.ndarray:
    """(3, 3) pinhole matrix of a MuJoCo camera: fovy spans the image height, square pixels, integer pixel centres."""
    focal = height / (2 * math.tan(math.radians(fovy_degrees) / 2))
    return np.array([[focal, 0.0, (width - 1) / 2], [0.0, focal, (height - 1) / 2], [0.0, 0.0, 1.0]])


def generate_mujoco_episode(
    seed: int,
    num_frames: int = 48,
    image_size: int = 128,
    num_points: int = 256,
    moving_camera: bool = False,
    skill: str | None = None,
) -> MujocoEpisode:
    """Render a deterministic MuJoCo episode: a gripper pushes, carries or stacks an object, or opens/closes a drawer.

    Args:
        seed: seeds a `numpy.random.Generator`; the same arguments always give identical arrays.
        num_frames: number of frames T (>= 2).
        image_size: height and width of the square images, in [16, 2048].
        num_points: number of tracked surface points N (>= 2), all visible at frame 0; half lie on the moving
            bodies (the gripper and what it moves), shared equally between them.
        moving_camera: slowly orbit the camera instead of keeping it fixed.
        skill: one of `SKILLS`; sampled from the seed when None.
    """
    if num_frames < 2:
        raise ValueError(f"num_frames must be >= 2, got {num_frames}")
    if not 16 <= image_size <= 2048:
        raise ValueError(f"image_size must be in [16, 2048], got {image_size}")
    if num_points < 2:
        raise ValueError(f"num_points must be >= 2, got {num_points}")
    if skill is not None and skill not in SKILLS:
        raise ValueError(f"skill must be one of {SKILLS} or None, got {skill!r}")
    mujoco = import_mujoco()

    rng = np.random.default_rng(seed)
    skill = skill if skill is not None else SKILLS[rng.integers(len(SKILLS))]
    world_to_camera = _camera_path(rng, num_frames, moving_camera)
    intrinsics = camera_intrinsics(_FIELD_OF_VIEW_DEG, image_size, image_size)
    for _ in range(_MAX_LAYOUT_ATTEMPTS):
        bodies, instruction = _sample_scene(rng, skill, num_frames)
        mjcf = _scene_xml(rng, bodies, image_size)
        model = mujoco.MjModel.from_xml_string(mjcf)
        qpos = _joint_positions(model, bodies)
        positions, rotations = _body_poses(mujoco, model, qpos)
        local, point_bodies = _candidate_points(rng, mujoco, model)
        candidates = np.einsum("tnij,nj->tni", rotations[:, point_bodies], local) + positions[:, point_bodies]
        if not _scene_is_valid(candidates, point_bodies, model, bodies, world_to_camera, intrinsics, image_size):
            continue
        frames, depth, extrinsics = _render(mujoco, model, qpos, world_to_camera, image_size)
        visible = _visibility(candidates[0], depth[0], extrinsics[0], intrinsics)
        moving_bodies = [model.body(body.key).id for body in _flatten(bodies) if body.moving]
        if all((visible & (point_bodies == b)).sum() >= _MIN_VISIBLE_PER_MOVING_BODY for b in moving_bodies):
            break
    else:
        raise RuntimeError(f"could not sample a valid MuJoCo scene for seed {seed} and skill {skill!r}")

    chosen = _choose_points(rng, num_points, visible, point_bodies, moving_bodies)
    tracks_world = candidates[:, chosen].astype(np.float32)
    # object ids: 0 is the table (MuJoCo's world body), k >= 1 the k-th body in `object_names`
    scene_bodies = _flatten(bodies)
    body_ids = np.array([0] + [model.body(body.key).id for body in scene_bodies])
    object_ids = np.argmax(point_bodies[chosen, None] == body_ids[None], axis=1).astype(np.int64)
    return MujocoEpisode(
        frames=frames,
        depth=depth,
        intrinsics=intrinsics.astype(np.float32),
        extrinsics=extrinsics.astype(np.float32),
        tracks_world=tracks_world,
        visible=np.stack([_visibility(tracks_world[t], depth[t], extrinsics[t], intrinsics) for t in range(num_frames)]),
        object_ids=object_ids,
        moving=np.isin(point_bodies[chosen], moving_bodies),
        task=instruction,
        skill=skill,
        seed=seed,
        object_names=["table"] + [body.name for body in scene_bodies],
        qpos=qpos,
        mjcf=mjcf,
    )


# ------------------------------------------------------------------------------------------------ scene


def _floats(values) -> str:
    return " ".join(f"{float(v):.6g}" for v in values)


def _box(name: str, half, center, material: str) -> str:
    return f'<geom name="{name}" type="box" size="{_floats(half)}" pos="{_floats(center)}" material="{material}"/>'


def _flatten(bodies) -> list[_Body]:
    return [flat for body in bodies for flat in (body, *_flatten(body.children))]


def _movable(rng: np.random.Generator, color: str, xy: np.ndarray, num_frames: int) -> tuple[_Body, np.ndarray]:
    """A box or cylinder resting on the table, and its half extents (x, y, z)."""
    if rng.integers(2) == 0:
        half = rng.uniform(0.02, 0.032, size=3)
        name, geom = f"{color} block", _box(f"{color}_box", half, (0, 0, 0), color)
    else:
        radius, half_height = rng.uniform(0.018, 0.028), rng.uniform(0.02, 0.035)
        half = np.array([radius, radius, half_height])
        name = f"{color} cylinder"
        geom = f'<geom name="{color}_cylinder" type="cylinder" size="{radius:.6g} {half_height:.6g}" material="{color}"/>'
    motion = np.tile([*xy, half[2], rng.uniform(-0.3, 0.3)], (num_frames, 1))
    return _Body(name, geom, "free", motion), half


def _extent_along(body: _Body, half: np.ndarray, direction: np.ndarray) -> float:
    """Distance from a resting body's vertical axis to its side facing the horizontal unit vector `direction`."""
    if body.name.endswith("cylinder"):
        return float(half[0])
    return float(np.abs(_yaw_rotations(np.asarray(body.motion[0, 3])).T @ direction) @ half)


def _gripper_geoms(opening: float, finger_length: float) -> str:
    """A palm at the body origin and two fingers hanging below it, `opening` apart along the body's x axis."""
    thickness, width = _FINGER_HALF
    finger_z = -_PALM_HALF_Z - finger_length / 2
    return "".join(
        [
            _box("palm", (opening / 2 + 2 * thickness, width, _PALM_HALF_Z), (0, 0, 0), "gripper"),
            _box("finger_left", (thickness, width, finger_length / 2), (-opening / 2 - thickness, 0, finger_z), "gripper"),
            _box("finger_right", (thickness, width, finger_length / 2), (opening / 2 + thickness, 0, finger_z), "gripper"),
        ]
    )


def _cabinet(rng: np.random.Generator, color: str, opening: np.ndarray) -> tuple[_Body, np.ndarray]:
    """A cabinet facing the camera (-y) whose drawer slides out by `opening`; returns it and the closed handle centre."""
    width, depth, height = rng.uniform(0.05, 0.065), 0.045, rng.uniform(0.03, 0.04)  # half extents
    wall = _CABINET_WALL
    cabinet_geoms = "".join(
        [
            _box("cabinet_bottom", (width, depth, wall / 2), (0, 0, wall / 2), "cabinet"),
            _box("cabinet_top", (width, depth, wall / 2), (0, 0, 2 * height - wall / 2), "cabinet"),
            _box("cabinet_left", (wall / 2, depth, height), (-width + wall / 2, 0, height), "cabinet"),
            _box("cabinet_right", (wall / 2, depth, height), (width - wall / 2, 0, height), "cabinet"),
            _box("cabinet_back", (width, wall / 2, height), (0, depth - wall / 2, height), "cabinet"),
        ]
    )
    # the tray fits inside the walls with 2 mm of play; the front panel covers the cabinet's open front
    tray_width, tray_back = width - wall - 0.002, depth - wall - 0.002
    tray_half_y, tray_y = (tray_back + depth) / 2, (tray_back - depth) / 2
    wall_half_z = 0.6 * (height - wall)
    handle_y = -depth - 0.006 - _HANDLE_STANDOFF - _HANDLE_HALF
    post_y = handle_y + _HANDLE_HALF + _HANDLE_STANDOFF / 2  # posts join the bar to the front panel
    tray_wall, tray_wall_z = (0.002, tray_half_y, wall_half_z), wall + wall_half_z
    post = (0.003, _HANDLE_STANDOFF / 2, 0.003)
    drawer_geoms = "".join(
        [
            _box("drawer_front", (width - 0.001, 0.003, height - 0.001), (0, -depth - 0.003, height), "drawer"),
            _box("drawer_bottom", (tray_width, tray_half_y, 0.002), (0, tray_y, wall + 0.003), "drawer"),
            _box("drawer_left", tray_wall, (-tray_width + 0.002, tray_y, tray_wall_z), "drawer"),
            _box("drawer_right", tray_wall, (tray_width - 0.002, tray_y, tray_wall_z), "drawer"),
            _box("drawer_back", (tray_width, 0.002, wall_half_z), (0, tray_back - 0.002, tray_wall_z), "drawer"),
            _box("handle", (0.025, _HANDLE_HALF, _HANDLE_HALF), (0, handle_y, height), "gripper"),
            _box("handle_left", post, (-0.021, post_y, height), "gripper"),
            _box("handle_right", post, (0.021, post_y, height), "gripper"),
        ]
    )
    position = (rng.uniform(-0.05, 0.05), rng.uniform(0.03, 0.07), 0.0)
    drawer = _Body(f"{color} drawer", drawer_geoms, "slide", opening[:, None], touches=(f"{color} cabinet",))
    cabinet = _Body(f"{color} cabinet", cabinet_geoms, None, np.zeros((len(opening), 0)), position, children=(drawer,))
    return cabinet, np.array([position[0], position[1] + handle_y, height])


def _sample_scene(rng: np.random.Generator, skill: str, num_frames: int) -> tuple[list[_Body], str]:
    """Lay out the bodies and script the manipulation; returns the top-level bodies (gripper last) and the instruction.

    Layouts may collide or leave the image; the caller rejects those with `_scene_is_valid`.
    """
    drawer_skill = skill in ("open", "close")
    low, high = (0, 3) if drawer_skill else (2 if skill == "stack" else 1, 4)
    num_objects = int(rng.integers(low, high))
    colors = [str(c) for c in rng.choice(list(BLOCK_COLORS), size=num_objects + 1, replace=False)]
    xy = np.stack([rng.uniform(-0.12, 0.12, num_objects), rng.uniform(-0.08, 0.08, num_objects)], axis=1)
    objects, halves = [], []
    for color, position in zip(colors, xy):
        body, half = _movable(rng, color, position, num_frames)
        objects.append(body)
        halves.append(half)
    progress = np.linspace(0.0, 1.0, num_frames)
    phase = np.clip((progress - _APPROACH_END) / (_RETREAT_START - _APPROACH_END), 0.0, 1.0)
    up = np.array([0.0, 0.0, 1.0])
    approach_offset = _GRIPPER_HOVER * up

    if drawer_skill:
        travel = rng.uniform(0.04, 0.06)
        opening = travel * (_ease(phase) if skill == "open" else 1.0 - _ease(phase))
        cabinet, handle = _cabinet(rng, colors[-1], opening)
        target = cabinet.children[0]
        objects.append(cabinet)
        grip_center = handle - np.outer(opening, [0.0, 1.0, 0.0]) + up * (_HANDLE_HALF + 0.001 + _PALM_HALF_Z)
        gripper_geoms = _gripper_geoms(2 * (_HANDLE_HALF + _GAP), 2 * _HANDLE_HALF + 0.003)
        gripper_yaw = np.pi / 2  # fingers in front of and behind the handle bar
        touches = (target.name, cabinet.name)  # works right in front of the cabinet
        instruction = f"{skill} the {target.name}"
    else:
        target, half = objects[0], halves[0]
        start = target.motion[0, :3].copy()
        # the gripper shares the object's yaw, so its fingers close along the object's own x axis
        gripper_geoms = _gripper_geoms(2 * (half[0] + _GAP), half[2] + 0.001)  # fingertips reach the middle
        grip_offset = up * (half[2] + 0.001 + _PALM_HALF_Z)
        gripper_yaw = target.motion[0, 3]
        touches = (target.name,)
        if skill == "push":
            direction_name = list(_PUSH_DIRECTIONS)[rng.integers(len(_PUSH_DIRECTIONS))]
            direction = np.array(_PUSH_DIRECTIONS[direction_name])
            target.motion[:, :3] = start + np.outer(_ease(phase), direction * rng.uniform(0.07, 0.12))
            finger_length = 0.03
            grip_offset = -direction * (_extent_along(target, half, direction) + _FINGER_HALF[1] + _GAP)
            grip_offset[2] = 0.004 + finger_length + _PALM_HALF_Z - half[2]  # fingertips just above the table
            gripper_geoms = _gripper_geoms(0.03, finger_length)
            gripper_yaw = math.atan2(direction[1], direction[0]) + np.pi / 2  # both fingers face the object
            approach_offset = approach_offset - 0.03 * direction
            verb = "push the {} to the {}" if direction_name in ("left", "right") else "slide the {} {}"
            instruction = verb.format(target.name, direction_name)
        elif skill == "pick_place":
            direction_name = ("left", "right")[rng.integers(2)]
            shift = np.array([-1.0 if direction_name == "left" else 1.0, 0.0, 0.0]) * rng.uniform(0.08, 0.14)
            target.motion[:, :3] = _carry_path(start, start + shift, phase)
            instruction = f"pick up the {target.name.replace('block', 'cube')} and place it on the {direction_name}"
        else:
            base, base_half = objects[1], halves[1]
            target.motion[:, :3] = _carry_path(start, base.motion[0, :3] + up * (base_half[2] + half[2]), phase)
            instruction = f"stack the {target.name} on the {base.name}"
        grip_center = target.motion[:, :3] + grip_offset

    # The gripper holds its target while manipulating, descends before and rises after.
    approach = 1.0 - _ease(progress / _APPROACH_END)
    retreat = _ease((progress - _RETREAT_START) / (1.0 - _RETREAT_START))
    center = grip_center + np.outer(approach, approach_offset) + np.outer(retreat, _GRIPPER_HOVER * up)
    gripper = _Body("gripper", gripper_geoms, "free", np.column_stack([center, np.full(num_frames, gripper_yaw)]),
                    moving=True, touches=touches)
    target.moving = True
    return objects + [gripper], instruction


def _scene_xml(rng: np.random.Generator, bodies: list[_Body], image_size: int) -> str:
    """The MJCF: seed-coloured checker table and gradient sky, one checker material per object colour, lights.

    Shadows stay off: with the software rasteriser their shadow maps speckle the table with acne.
    """
    table = [np.clip(np.array(c) * rng.uniform(0.75, 1.25), 0, 1) for c in TABLE_COLORS]
    sky = rng.uniform(0.55, 0.9, 3), rng.uniform(0.1, 0.35, 3)
    light = np.array([rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 0.8), rng.uniform(0.1, 0.5), -1.0])
    materials = {body.name.rsplit(" ", 1)[0] for body in _flatten(bodies) if body.name != "gripper"}
    textures = "".join(
        f'<texture name="{color}" type="cube" builtin="checker" width="32" height="32" '
        f'rgb1="{_floats(BLOCK_COLORS[color])}" rgb2="{_floats(np.array(BLOCK_COLORS[color]) * 0.8)}"/>'
        f'<material name="{color}" texture="{color}"/>'
        for color in sorted(materials)
    )
    cabinet_color = next((b.name.split()[0] for b in bodies if b.name.endswith("cabinet")), None)
    aliases = (f'<material name="cabinet" texture="{cabinet_color}"/><material name="drawer" texture="{cabinet_color}" '
               'rgba=".9 .9 .9 1"/>') if cabinet_color else ""
    return f"""<mujoco model="tabletop">
  <option><flag contact="disable" gravity="disable"/></option>
  <statistic extent="1" center="0 0 0"/>
  <visual>
    <global offwidth="{image_size}" offheight="{image_size}"/>
    <map znear="0.01" zfar="10"/>
    <headlight ambient=".35 .35 .35" diffuse=".35 .35 .35" specular="0 0 0"/>
  </visual>
  <asset>
    <texture name="table" type="2d" builtin="checker" width="64" height="64"
             rgb1="{_floats(table[0])}" rgb2="{_floats(table[1])}"/>
    <material name="table" texture="table" texrepeat="{_floats(rng.uniform(12, 20, 2))}" texuniform="true"/>
    <texture name="sky" type="skybox" builtin="gradient" width="32" height="32"
             rgb1="{_floats(sky[0])}" rgb2="{_floats(sky[1])}"/>
    <material name="gripper" rgba="{_floats(GRIPPER_COLOR)} 1"/>
    {textures}{aliases}
  </asset>
  <worldbody>
    <light directional="true" castshadow="false" pos="0 0 2" dir="{_floats(light / np.linalg.norm(light))}"
           diffuse=".6 .6 .6"/>
    <camera name="{CAMERA_NAME}" pos="0 -0.5 0.5" fovy="{_FIELD_OF_VIEW_DEG}"/>
    <geom name="table" type="plane" size="1 1 0.01" material="table"/>
    {"".join(_body_xml(body) for body in bodies)}
  </worldbody>
</mujoco>"""


def _body_xml(body: _Body) -> str:
    joint = {"free": "<freejoint/>", "slide": f'<joint name="{DRAWER_JOINT}" type="slide" axis="0 -1 0"/>', None: ""}
    children = "".join(_body_xml(child) for child in body.children)
    return f'<body name="{body.key}" pos="{_floats(body.position)}">{joint[body.joint]}{body.geoms}{children}</body>'


def _joint_positions(model, bodies: list[_Body]) -> np.ndarray:
    """(T, nq) qpos of every frame, each body's joint written at its address in the model."""
    num_frames = len(bodies[-1].motion)
    qpos = np.zeros((num_frames, model.nq))
    for body in _flatten(bodies):
        if body.joint is not None:
            address = model.jnt_qposadr[model.body(body.key).jntadr[0]]
            values = body.qpos()
            qpos[:, address : address + values.shape[1]] = values
    return qpos


def _body_poses(mujoco, model, qpos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(T, nbody, 3) world positions and (T, nbody, 3, 3) rotations of every body, by forward kinematics."""
    data = mujoco.MjData(model)
    positions = np.empty((len(qpos), model.nbody, 3))
    rotations = np.empty((len(qpos), model.nbody, 3, 3))
    for t, frame_qpos in enumerate(qpos):
        data.qpos[:] = frame_qpos
        mujoco.mj_kinematics(model, data)
        positions[t], rotations[t] = data.xpos, data.xmat.reshape(-1, 3, 3)
    return positions, rotations


# ------------------------------------------------------------------------------------------ tracked points


def _candidate_points(rng: np.random.Generator, mujoco, model) -> tuple[np.ndarray, np.ndarray]:
    """Random points on every geom's surface, in its body's frame -> (P, 3) points and (P,) body ids.

    Boxes and cylinders get points in proportion to their area; the table plane only inside the region the camera
    sees, so few candidates are wasted.
    """
    points, bodies = [], []
    for geom in range(model.ngeom):
        size = model.geom_size[geom]
        kind = model.geom_type[geom]
        if kind == mujoco.mjtGeom.mjGEOM_PLANE:
            (x_low, x_high), (y_low, y_high) = _TABLE_SAMPLE_REGION
            count = int(_POINT_DENSITY * (x_high - x_low) * (y_high - y_low))
            local = np.column_stack([rng.uniform(x_low, x_high, count), rng.uniform(y_low, y_high, count), np.zeros(count)])
        elif kind == mujoco.mjtGeom.mjGEOM_BOX:
            local = _box_surface(rng, size)
        elif kind == mujoco.mjtGeom.mjGEOM_CYLINDER:
            local = _cylinder_surface(rng, size[0], size[1])
        else:
            raise ValueError(f"no surface sampler for MuJoCo geom type {kind}")
        rotation = np.empty(9)
        mujoco.mju_quat2Mat(rotation, model.geom_quat[geom])
        points.append(local @ rotation.reshape(3, 3).T + model.geom_pos[geom])
        bodies.append(np.full(len(local), model.geom_bodyid[geom]))
    return np.concatenate(points), np.concatenate(bodies)


def _box_surface(rng: np.random.Generator, half: np.ndarray) -> np.ndarray:
    """Uniform points on a box's six faces."""
    face_areas = np.array([half[1] * half[2], half[0] * half[2], half[0] * half[1]]).repeat(2) * 4
    count = max(16, int(_POINT_DENSITY * face_areas.sum()))
    faces = rng.choice(6, count, p=face_areas / face_areas.sum())
    points = rng.uniform(-1.0, 1.0, size=(count, 3)) * half
    axis = faces // 2
    points[np.arange(count), axis] = np.where(faces % 2 == 0, -1.0, 1.0) * half[axis]
    return points


def _cylinder_surface(rng: np.random.Generator, radius: float, half_height: float) -> np.ndarray:
    """Uniform points on a cylinder's side and caps."""
    side, cap = 4 * math.pi * radius * half_height, math.pi * radius**2
    count = max(16, int(_POINT_DENSITY * (side + 2 * cap)))
    on_side = rng.uniform(0, side + 2 * cap, count) < side
    angle = rng.uniform(0, 2 * math.pi, count)
    distance = np.where(on_side, radius, radius * np.sqrt(rng.uniform(0, 1, count)))
    height = np.where(on_side, rng.uniform(-half_height, half_height, count), rng.choice([-1.0, 1.0], count) * half_height)
    return np.column_stack([distance * np.cos(angle), distance * np.sin(angle), height])


def _scene_is_valid(
    candidates: np.ndarray,
    point_bodies: np.ndarray,
    model,
    bodies: list[_Body],
    world_to_camera: np.ndarray,
    intrinsics: np.ndarray,
    image_size: int,
) -> bool:
    """Reject scenes whose bodies leave the image at any frame or interpenetrate where the script does not say so.

    Interpenetration is tested conservatively on each body's bounding vertical cylinder around its surface points.
    """
    off_table = point_bodies != 0
    for t in range(len(candidates)):
        uv, z = project_points(candidates[t, off_table], world_to_camera[t], intrinsics)
        if (z <= 0).any() or (uv < 1).any() or (uv > image_size - 2).any():
            return False
    scene = _flatten(bodies)
    extents = []
    for body in scene:
        points = candidates[:, point_bodies == model.body(body.key).id]
        center = (points[..., :2].min(axis=1) + points[..., :2].max(axis=1)) / 2
        radius = np.linalg.norm(points[..., :2] - center[:, None], axis=-1).max(axis=1)
        extents.append((center, radius, points[..., 2].min(axis=1), points[..., 2].max(axis=1)))
    for a in range(len(scene)):
        for b in range(a + 1, len(scene)):
            if scene[b].name in scene[a].touches or scene[a].name in scene[b].touches:
                continue
            (center_a, radius_a, bottom_a, top_a), (center_b, radius_b, bottom_b, top_b) = extents[a], extents[b]
            planar = np.linalg.norm(center_a - center_b, axis=-1) < radius_a + radius_b + 0.005
            vertical = (bottom_a < top_b - 1e-4) & (bottom_b < top_a - 1e-4)
            if (planar & vertical).any():
                return False
    return True


def _choose_points(
    rng: np.random.Generator, num_points: int, visible: np.ndarray, point_bodies: np.ndarray, moving_bodies: list[int]
) -> np.ndarray:
    """Indices of candidates visible at frame 0: half shared equally by the moving bodies, the rest static.

    A quarter of the static half is shared among the static bodies other than the table, so that each gets points
    (they are small next to the table), as in the procedural source.
    """
    num_moving = num_points // 2
    per_moving = np.diff(np.linspace(0, num_moving, len(moving_bodies) + 1).astype(int))
    groups = [(point_bodies == body, count) for body, count in zip(moving_bodies, per_moving)]
    static_bodies = [b for b in np.unique(point_bodies[visible]) if b != 0 and b not in moving_bodies]
    per_static = (num_points - num_moving) // (4 * max(len(static_bodies), 1))
    groups += [(point_bodies == body, per_static) for body in static_bodies]
    groups.append((point_bodies == 0, num_points - num_moving - per_static * len(static_bodies)))
    return np.concatenate([_draw(rng, np.flatnonzero(mask & visible), count) for mask, count in groups])


# ------------------------------------------------------------------------------------------------ render


def _render(
    mujoco, model, qpos: np.ndarray, world_to_camera: np.ndarray, image_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Film every frame -> (T, H, W, 3) uint8 RGB, (T, H, W) float32 depth, (T, 4, 4) world -> camera.

    The camera is placed from `world_to_camera`, but the extrinsics returned are read back from MuJoCo's own camera
    pose, so they are exactly what the rasteriser used. MuJoCo cameras look along -z with y up; OpenCV's y and z
    are their negatives.
    """
    num_frames = len(qpos)
    flip = np.diag([1.0, -1.0, -1.0])
    camera = model.camera(CAMERA_NAME).id
    data = mujoco.MjData(model)
    frames = np.empty((num_frames, image_size, image_size, 3), dtype=np.uint8)
    depth = np.empty((num_frames, image_size, image_size), dtype=np.float32)
    extrinsics = np.tile(np.eye(4), (num_frames, 1, 1))
    try:
        renderer = mujoco.Renderer(model, image_size, image_size)
    except Exception as error:  # the GL backends raise assorted error types
        backend = getattr(getattr(mujoco, "gl_context", None), "GLContext", None)
        raise RuntimeError(
            f"MuJoCo could not create an offscreen OpenGL context ({error}); MUJOCO_GL="
            f"{os.environ.get('MUJOCO_GL')!r}, backend in use: {getattr(backend, '__module__', 'unknown')}. Set "
            "MUJOCO_GL=egl (GPU or Mesa EGL) or MUJOCO_GL=osmesa (software) before anything imports mujoco, and "
            "install that backend's libraries."
        ) from error
    with renderer:
        for t in range(num_frames):
            rotation = world_to_camera[t, :3, :3]
            model.cam_pos[camera] = -rotation.T @ world_to_camera[t, :3, 3]
            mujoco.mju_mat2Quat(model.cam_quat[camera], (rotation.T @ flip).ravel())
            data.qpos[:] = qpos[t]
            mujoco.mj_forward(model, data)
            renderer.update_scene(data, camera=CAMERA_NAME)
            frames[t] = renderer.render()
            renderer.enable_depth_rendering()
            depth[t] = renderer.render()
            renderer.disable_depth_rendering()
            camera_rotation = (data.cam_xmat[camera].reshape(3, 3) @ flip).T
            extrinsics[t, :3, :3] = camera_rotation
            extrinsics[t, :3, 3] = -camera_rotation @ data.cam_xpos[camera]
    return frames, depth, extrinsics


__all__ = ["MujocoEpisode", "SKILLS", "camera_intrinsics", "generate_mujoco_episode", "import_mujoco"]
