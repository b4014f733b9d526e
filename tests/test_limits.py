"""Abuse limits: the sliding-window RateLimiter, the per-owner image quota, retention, and the
messages people see through the real app."""

import datetime as dt
import threading

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from access import EVERYONE
from app_server import running_app
from errors import InvalidInput, LimitExceeded
from helpers import RecordsSegmenter, encode, house_masks, make_photo
from rate_limits import RateLimiter, minutes_text, run_periodically
from settings import Settings
from storage import Database, LocalBlobStore
from studio import Studio


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_studio(tmp_path, segmenter=None, **settings):
    s = Settings(data_dir=tmp_path, **settings)
    return Studio(s, segmenter or RecordsSegmenter(house_masks), Database(s.db_path), LocalBlobStore(s.blob_dir))


PHOTO = encode(make_photo(48, 64))


# ---- RateLimiter ---------------------------------------------------------------------------
def test_sliding_window_refuses_then_frees_one_slot_at_a_time():
    clock = FakeClock()
    rl = RateLimiter(3, window_s=3600, clock=clock)
    for dt_s in (0, 600, 1200):
        clock.t += dt_s and 600
        assert rl.hit(["owner:a"]) is None
    assert rl.hit(["owner:a"]) == ("owner:a", 3600 - 1200)
    clock.t += 3600 - 1200  # the first event leaves the window: exactly one slot
    assert rl.hit(["owner:a"]) is None
    assert rl.hit(["owner:a"]) == ("owner:a", 600)


def test_a_refused_hit_counts_nothing_for_any_key():
    clock = FakeClock()
    rl = RateLimiter(1, clock=clock)
    assert rl.hit(["owner:a", "addr:1.2.3.4"]) is None
    assert rl.hit(["owner:b", "addr:1.2.3.4"])[0] == "addr:1.2.3.4"
    assert rl.used("owner:b") == 0
    assert rl.hit(["owner:b", "addr:5.6.7.8"]) is None


def test_zero_means_no_limit():
    rl = RateLimiter(0)
    assert all(rl.hit(["k"]) is None for _ in range(1000))


def test_concurrent_hits_never_exceed_the_limit():
    rl = RateLimiter(50)
    granted = []
    barrier = threading.Barrier(8)

    def worker():
        barrier.wait()
        granted.extend(1 for _ in range(100) if rl.hit(["owner:x"]) is None)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(granted) == 50


def test_old_keys_are_forgotten():
    clock = FakeClock()
    rl = RateLimiter(1, window_s=10, clock=clock)
    for i in range(2048):
        rl.hit([f"addr:{i}"])
    clock.t += 11
    for _ in range(2048):
        rl.hit(["addr:same"])
    assert len(rl._events) <= 1025


@pytest.mark.parametrize(
    "seconds, text", [(1, "1 minute"), (60, "1 minute"), (61, "2 minutes"), (719, "12 minutes"), (3600, "60 minutes")]
)
def test_minutes_are_rounded_up(seconds, text):
    assert minutes_text(seconds) == text


def test_run_periodically_runs_and_stops():
    ran = threading.Event()
    stop = run_periodically(ran.set, 0.01, "test job")
    assert ran.wait(5)
    stop.set()


# ---- Studio: rate, quota, retention ------------------------------------------------------------
def test_segmentation_limit_message_says_which_limit_and_when(tmp_path):
    studio = make_studio(tmp_path, segment_rate_limit=2)
    clock = FakeClock()
    studio.quotas.limiter = RateLimiter(2, clock=clock)
    studio.generate_and_store(PHOTO, owner="alice", address="10.0.0.1")
    clock.t += 48 * 60
    studio.generate_and_store(PHOTO, owner="alice", address="10.0.0.2")
    with pytest.raises(LimitExceeded) as info:
        studio.generate_and_store(PHOTO, owner="alice", address="10.0.0.3")
    assert info.value.message == (
        "You have used your 2 segmentations for this hour (SEGMENT_RATE_LIMIT); the next one is possible in 12 minutes."
    )
    studio.generate_and_store(PHOTO, owner="bob", address="10.0.0.9")
    studio.generate_and_store(PHOTO, owner="bob", address="10.0.0.9")
    with pytest.raises(LimitExceeded) as info:  # another owner from an address already at its limit
        studio.generate_and_store(PHOTO, owner="carol", address="10.0.0.9")
    assert info.value.message.startswith("Your network address has used its 2 segmentations for this hour")
    # The segmenter is a paid service: a refused request never reaches it.
    assert studio.segmenter.calls == 4
    assert studio.db.count_images("alice") == 2


def test_an_unreadable_image_is_not_counted(tmp_path):
    studio = make_studio(tmp_path, segment_rate_limit=1)
    with pytest.raises(InvalidInput):
        studio.generate_and_store(b"not an image", owner="alice")
    studio.generate_and_store(PHOTO, owner="alice")


def test_image_quota_is_atomic_under_concurrent_uploads(tmp_path):
    barrier = threading.Barrier(2)

    class InLockstep(RecordsSegmenter):
        def generate(self, image, *, progress=None, cancel=None):
            barrier.wait(timeout=10)  # both uploads are past the early check before either stores
            return super().generate(image, progress=progress)

    studio = make_studio(tmp_path, InLockstep(house_masks), max_images_per_owner=1)
    outcomes = []

    def upload(i):
        try:
            outcomes.append(studio.generate_and_store(PHOTO, image_id=f"race-{i}", owner="alice")["image_id"])
        except LimitExceeded as exc:
            outcomes.append(exc.message)

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stored = [o for o in outcomes if o.startswith("race-")]
    refused = [o for o in outcomes if not o.startswith("race-")]
    assert len(stored) == 1 and len(refused) == 1
    assert refused[0] == (
        "You have stored 1 images, the most allowed (MAX_IMAGES_PER_OWNER = 1); "
        "delete one in the library (or with /delete_image) to make room."
    )
    # The loser's blob went with it; the winner is intact.
    assert sorted(studio.blobs.keys()) == sorted(studio.db.blob_keys())
    assert studio.info(stored[0], "alice")["mask_count"] == 4


def test_a_full_library_costs_no_segmentation_and_makes_room_after_a_delete(tmp_path):
    studio = make_studio(tmp_path, max_images_per_owner=2, retention_days=30)
    studio.generate_and_store(PHOTO, image_id="one", owner="alice")
    studio.generate_and_store(PHOTO, image_id="two", owner="alice")
    with pytest.raises(LimitExceeded) as info:
        studio.generate_and_store(PHOTO, image_id="three", owner="alice")
    assert "MAX_IMAGES_PER_OWNER = 2" in info.value.message and "RETENTION_DAYS = 30" in info.value.message
    assert studio.segmenter.calls == 2
    studio.generate_and_store(PHOTO, image_id="bobs", owner="bob")  # the quota is per owner
    studio.delete("one", "alice")
    studio.generate_and_store(PHOTO, image_id="three", owner="alice")


def test_retention_removes_old_images_and_their_blobs(tmp_path):
    studio = make_studio(tmp_path, retention_days=7)
    studio.generate_and_store(PHOTO, image_id="old", owner="alice")
    studio.generate_and_store(PHOTO, image_id="new", owner="bob")
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=3)
    assert studio.purge_expired(later) == 0
    # Make "old" 10 days old in the database, as if it had been stored then.
    ten_days_ago = (dt.datetime.now(dt.UTC) - dt.timedelta(days=10)).isoformat(timespec="seconds")
    old, new = studio.find("old", "alice").id, studio.find("new", "bob").id
    studio.db.db.execute("UPDATE images SET created_at = ? WHERE id = ?", (ten_days_ago, old))
    assert studio.purge_expired() == 1
    assert [r.id for r in studio.db.list_images(EVERYONE)] == [new]
    assert sorted(studio.blobs.keys()) == sorted(studio.db.blob_keys())
    assert make_studio(tmp_path / "off").purge_expired(later + dt.timedelta(days=999)) == 0


def test_retention_runs_at_start_up(tmp_path):
    import app

    studio = make_studio(tmp_path)
    studio.generate_and_store(PHOTO, image_id="ancient", owner="alice")
    studio.db.db.execute("UPDATE images SET created_at = '2000-01-01T00:00:00+00:00'")
    restarted = app.create_studio(Settings(data_dir=tmp_path, retention_days=1, segmenter="builtin"))
    assert restarted.db.list_images(None) == [] and list(restarted.blobs.keys()) == []


# ---- through the real app -----------------------------------------------------------------------
def test_limits_through_the_api(tmp_path):
    keys = (("alice", "alice-key-0123456789"), ("bob", "bob-key-0123456789"))
    photo = tmp_path / "p.png"
    photo.write_bytes(PHOTO)
    with running_app(
        tmp_path / "data",
        RecordsSegmenter(house_masks),
        auth_mode="keys",
        app_api_keys=keys,
        segment_rate_limit=3,
        max_images_per_owner=2,
    ) as (url, *_):
        alice, bob = (Client(url, verbose=False, headers={"Authorization": f"Bearer {k}"}) for _, k in keys)

        def gen(c, image_id):
            return c.predict(handle_file(str(photo)), image_id, api_name="/generate_and_store_masks")

        def refused(c, image_id):
            with pytest.raises(AppError) as info:
                gen(c, image_id)
            return info.value.message

        gen(alice, "a1")
        gen(alice, "a2")
        assert "You have stored 2 images, the most allowed (MAX_IMAGES_PER_OWNER = 2)" in refused(alice, "a3")
        alice.predict("a1", api_name="/delete_image")
        gen(alice, "a3")
        alice.predict("a2", api_name="/delete_image")
        assert refused(alice, "a4") == (
            "You have used your 3 segmentations for this hour (SEGMENT_RATE_LIMIT); "
            "the next one is possible in 60 minutes."
        )
        # bob has his own quota, but shares alice's address (loopback), which is at its limit too.
        assert refused(bob, "b1").startswith("Your network address has used its 3 segmentations for this hour")
        # Nothing stored is damaged, and everything else still works.
        assert [i["image_id"] for i in alice.predict(api_name="/list_images")] == ["a3"]
        assert alice.predict("a3", api_name="/image_info")["mask_count"] == 4
