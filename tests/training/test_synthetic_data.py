import numpy as np
import torch

from generation.dataset.shard_format import read_shard
from training.drawn_clips import make_clip
from training.synthetic_data import SceneTransform, shard_urls, synthetic_batches, synthetic_index
from training.tasks.pose import matrix_to_quat, mirror_poses, object_poses, quat_to_matrix


def transform(**kw):
    args = dict(num_frames=4, img_size=32, label_size=16, depth_max_m=10.0, pose_slots=3,
                crop_scale=(0.5, 1.0), flip=True, train=True, seed=0)
    args.update(kw)
    return SceneTransform(**args)


def test_batches_from_shards_have_the_model_shapes(shard_dir):
    urls = shard_urls(shard_dir)
    assert synthetic_index(shard_dir).clips == 8    # from the manifest, not the tars
    batches = synthetic_batches(urls, transform(), batch_size=2, seed=0, epoch=0,
                                shuffle_buffer=4, num_workers=2)
    batch = next(batches)
    assert batch["video"].shape == (2, 3, 4, 32, 32)
    assert batch["depth"].shape == (2, 4, 16, 16)
    assert 0 <= batch["depth"].min() and batch["depth"].max() <= 1.0  # sky (+inf) clipped
    assert batch["normals"].shape == (2, 4, 3, 16, 16)
    assert batch["segmentation"].dtype == torch.long
    assert batch["pose_position"].shape == (2, 4, 3, 3)
    assert batch["pose_presence"][:, :, :2].all() and not batch["pose_presence"][:, :, 2].any()


def test_an_epoch_is_a_pure_function_of_seed_and_epoch(shard_dir):
    urls = shard_urls(shard_dir)
    def take(epoch):
        batches = synthetic_batches(urls, transform(), batch_size=2, seed=3, epoch=epoch,
                                    shuffle_buffer=4, num_workers=2)
        return [next(batches)["video"] for _ in range(5)]

    first, again, other = take(0), take(0), take(1)
    for a, b in zip(first, again, strict=True):
        torch.testing.assert_close(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_flip_moves_every_label_with_the_pixels_and_mirrors_normals():
    clip = make_clip("c", seed=1, frames=4, size=32)
    # a normal with an x component, so mirroring is visible
    clip["normal"][..., 0] = np.where(clip["semantic_seg"] >= 2, 0.6, 0.0)
    plain = transform(flip=False, crop_scale=(1.0, 1.0), label_size=32)(clip)
    for seed in range(20):  # find a seed whose coin says flip
        flipped = transform(crop_scale=(1.0, 1.0), label_size=32, seed=seed)(clip)
        if not torch.equal(flipped["segmentation"], plain["segmentation"]):
            break
    torch.testing.assert_close(flipped["segmentation"], plain["segmentation"].flip(-1))
    torch.testing.assert_close(flipped["depth"], plain["depth"].flip(-1))
    torch.testing.assert_close(flipped["video"], plain["video"].flip(-1), atol=1e-4, rtol=0)
    torch.testing.assert_close(flipped["normals"][:, 0], -plain["normals"][:, 0].flip(-1))
    torch.testing.assert_close(flipped["normals"][:, 1:], plain["normals"][:, 1:].flip(-1))
    torch.testing.assert_close(flipped["pose_position"][..., 0], -plain["pose_position"][..., 0])


def test_mirrored_quaternion_is_the_reflected_rotation():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(5, 4))
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    np.testing.assert_allclose(quat_to_matrix(matrix_to_quat(quat_to_matrix(q))), quat_to_matrix(q),
                               atol=1e-6)
    reflect = np.diag([-1.0, 1.0, 1.0])
    poses = {"pose_position": np.zeros((5, 1, 3)), "pose_quaternion": q[:, None],
             "pose_presence": np.ones((5, 1))}
    mirrored = mirror_poses(poses)["pose_quaternion"][:, 0]
    np.testing.assert_allclose(quat_to_matrix(mirrored), reflect @ quat_to_matrix(q) @ reflect,
                               atol=1e-6)


def test_poses_are_in_the_camera_frame_and_skip_the_floor():
    clip = make_clip("c", seed=2, frames=2)
    shift = np.eye(4, dtype=np.float32)
    shift[:3, 3] = (1.0, 2.0, 3.0)
    clip["world_to_camera"][:] = shift
    poses = object_poses(clip, np.arange(2), slots=4)
    want = clip["instances"]["position"][1:3].transpose(1, 0, 2) + shift[:3, 3]
    np.testing.assert_allclose(poses["pose_position"][:, :2], want, atol=1e-6)
    assert poses["pose_presence"][:, 2:].sum() == 0


def test_shard_round_trip_through_the_generation_reader(shard_dir):
    clips = list(read_shard(shard_urls(shard_dir)[0]))
    assert len(clips) == 4 and clips[0]["depth"].dtype == np.float32
