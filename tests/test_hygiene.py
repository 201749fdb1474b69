"""Profile hygiene: PII patterns on hand-checked text (and none on text that only looks like
numbers), duplicate counts, and cleaning that reaches the models but never the files."""
import json

from conftest import write_json_lines
from model.config import ExperimentConfig
from model.hygiene import duplicate_counts, scrub_pii
from model.pipeline import load_data


def test_each_kind_of_personal_data_is_replaced_and_counted():
    text, found = scrub_pii("Mail john.doe+x@example.co.uk or call (555) 123-4567, see "
                            "https://foo.com/bar?x=1. Card 4111 1111 1111 1111, "
                            "UK +44 20 7946 0958.")
    assert text == ("Mail [EMAIL] or call [PHONE], see [URL]. Card [CARD], UK [PHONE].")
    assert found == {"email": 1, "phone": 2, "url": 1, "card": 1}
    text, found = scrub_pii("电话13812345678，邮箱abc@qq.com。")
    assert text == "电话[PHONE]，邮箱[EMAIL]。" and found == {"phone": 1, "email": 1}
    assert scrub_pii("call +86 138 1234 5678") == ("call [PHONE]", {"phone": 1})


def test_numbers_and_handles_that_are_not_personal_data_stay():
    for text in ("1200 Chophouse in 1950's style, $12.99, open 9-5, 2019 and 2020",
                 "1234 Main St, Tucson 85001", "AM@FM in Nashville and @Ramen",
                 "Card-like but not Luhn: 4111 1111 1111 1112", "Seasons 2015 2016 2017 2018",
                 "ISBN 0306406152, at 1617181920 (Unix time)"):
        assert scrub_pii(text) == (text, {})


def test_exact_and_near_duplicates_are_counted_once_per_extra_copy():
    base = "Fans of tacos, cold beer and a lively patio would enjoy this place in Tucson."
    counts = duplicate_counts([base, base.upper(), "  " + base, base.replace(".", "!"),
                               "A quiet bakery with fresh bread and good coffee.", None, ""])
    assert counts == {"texts": 5, "exact_duplicates": 2, "near_duplicates": 1,
                      "exact_groups": 1}


def test_models_see_cleaned_text_and_the_files_stay_as_they_were(easyrec_folder):
    profiles = easyrec_folder / "item_profile.json"
    write_json_lines(profiles, [
        {"item_id": 0, "profile": "Thai place in Tucson, call 520-555-0199 or a@b.com."},
        {"item_id": 1, "profile": "Coffee shop with pastries."},
        {"item_id": 3, "profile": "Coffee shop with pastries."}])
    before = profiles.read_bytes()
    config = ExperimentConfig().updated({"dataset": str(easyrec_folder)}, "test")
    dataset = load_data(config)
    assert dataset.item_profiles[0] == "Thai place in Tucson, call [PHONE] or [EMAIL]."
    assert profiles.read_bytes() == before
    report = dataset.summary()["profile_hygiene"]
    assert report["items"]["pii"]["written"] == {"email": 1, "url": 0, "card": 0, "phone": 1,
                                                 "profiles_changed": 1}
    assert report["items"]["duplicates_written"]["exact_duplicates"] == 1
    assert "[PHONE]" in dataset.user_profiles[0]  # built from the cleaned item text
    raw = load_data(config.updated({"clean_profiles": False}, "test"))
    assert "520-555-0199" in raw.item_profiles[0] and "profile_hygiene" not in raw.summary()
    json.dumps(report)  # goes into metrics.json as is
