"""Each person's main path through the web UI, in Chromium, against a running appliance.

An ML user creates a project, uploads a dataset, starts a run, watches it finish in real
runc, reads its metrics chart, registers and approves the model and exports it; an auditor
verifies and exports the audit log and checks it offline; a system admin manages users,
forces a logout and reads system health; a viewer sees no write controls and is refused.
"""

from __future__ import annotations

import re
import subprocess
import sys

from playwright.sync_api import expect

from tests.e2e.conftest import PASSWORD

RUN_TIMEOUT_MS = 120_000


def create_project(alice, name: str) -> str:
    page = alice.page
    page.goto("/ui/projects")
    page.locator("#project-name").fill(name)
    page.get_by_role("button", name="Create project").click()
    page.wait_for_url(re.compile(r".*/ui/projects/prj_[0-9a-z]+$"))
    return page.url


def test_each_persona_walks_their_main_path(people, appliance, tmp_path):
    alice = people("alice")
    page = alice.page

    # --- ML user: sign in, project, dataset, code, environment -------------------------------
    alice.sign_in("alice")
    expect(page.locator("main")).to_contain_text("not a member of any project yet")
    alice.shot("projects-empty")
    project_url = create_project(alice, "credit")
    page.get_by_role("link", name="Datasets", exact=True).click()
    page.locator("#dataset-name").fill("loans")
    page.get_by_role("button", name="Create dataset").click()
    expect(page.locator("main")).to_contain_text("no versions yet")
    page.locator("#files").set_input_files(
        [{"name": "rows.csv", "mimeType": "text/csv", "buffer": b"a,b\n1,2\n3,4\n"}]
    )
    page.get_by_role("button", name="Upload version").click()
    expect(page.locator("h1")).to_contain_text("loans v1")
    expect(page.locator("main")).to_contain_text("rows.csv")
    alice.shot("dataset-version")

    repo_url, commit = appliance.code_job
    page.get_by_role("link", name="Code", exact=True).click()
    page.locator("#repo-url").fill(repo_url)
    page.locator("#revision").fill(commit)
    page.get_by_role("button", name="Add code ref").click()
    expect(page.locator("main table")).to_contain_text(commit)
    page.get_by_role("link", name="Environments", exact=True).click()
    page.locator("#env-name").fill("runner")
    page.locator("#env-base").fill("runner")
    page.get_by_role("button", name="Create environment").click()
    page.locator("#lock-digest").fill(appliance.image_digest)
    page.get_by_role("button", name="Create lock").click()
    expect(page.locator("main")).to_contain_text(appliance.image_digest[:23])

    # --- start a production run and watch it finish -----------------------------------------
    page.get_by_role("link", name="Runs", exact=True).click()
    page.locator("#run-input").select_option(index=1)
    page.locator("#run-command").fill("python3 job.py ui-walk")
    page.locator("#run-production").check()
    page.get_by_role("button", name="Start run").click()
    page.wait_for_url(re.compile(r".*/runs/run_[0-9a-z]+$"))
    run_url = page.url
    alice.shot("run-started")
    # The page follows the run by itself (no reload from the test): state, then log lines.
    expect(page.locator("h1 .state")).to_have_text("succeeded", timeout=RUN_TIMEOUT_MS)
    expect(page.locator("pre.log")).to_contain_text("done ui-walk")
    expect(page.locator("pre.log")).to_contain_text("rows 3")
    chart = page.locator("svg.chart")
    expect(chart).to_have_count(1)
    expect(chart).to_have_attribute("aria-label", re.compile(r"metric loss: 3 points"))
    assert len(chart.locator("polyline.series").get_attribute("points").split()) == 3
    expect(page.locator("main")).to_contain_text("model.json")
    expect(page.locator("main")).to_contain_text("Digest sha256:")
    alice.shot("run-succeeded-metrics")
    with page.expect_download() as artifact:
        page.get_by_role("link", name="model.json").click()
    assert artifact.value.suggested_filename == "model.json"

    # --- register, approve and export the model ---------------------------------------------
    page.get_by_role("link", name="Models", exact=True).click()
    page.locator("#model-name").fill("credit-risk")
    page.get_by_role("button", name="Create model").click()
    page.goto(run_url)
    page.get_by_role("button", name="Register version").click()
    expect(page.locator("h1")).to_contain_text("credit-risk v1")
    expect(page.locator("h1 .state")).to_have_text("registered")
    page.locator("#approve-reason").fill("loss is low enough on the held-out rows")
    page.get_by_role("button", name="Approve").click()
    expect(page.locator("h1 .state")).to_have_text("approved")
    page.get_by_role("button", name="Write a signed export package").click()
    expect(page.locator("h1 .state")).to_have_text("exported")
    with page.expect_download() as package:
        page.get_by_role("link", name="Download the latest package").click()
    assert package.value.suggested_filename.startswith("credit-risk-v1-")
    alice.shot("model-approved-exported")

    # --- project admin: members --------------------------------------------------------------
    page.goto(project_url + "/members")
    page.locator("#member-user").fill("victor")
    page.locator("#member-role").select_option("viewer")
    page.get_by_role("button", name="Save").click()
    expect(page.locator("main table")).to_contain_text("victor")
    alice.shot("members")

    # --- auditor: log, chain status, export, offline verification -------------------------
    audrey = people("audrey")
    audrey.sign_in("audrey")
    audit = audrey.page
    audit.locator("#f-action").fill("model:version:approved")
    audit.get_by_role("button", name="Filter").click()
    expect(audit.locator("table.events tbody tr")).to_have_count(1)
    expect(audit.locator("table.events")).to_contain_text("user:alice")
    audrey.shot("audit-filtered")
    audit.get_by_role("link", name="Chain", exact=True).click()
    expect(audit.locator("main")).to_contain_text("Verified up to seq")
    audrey.shot("chain")
    audit.get_by_role("link", name="Export", exact=True).click()
    fingerprint = audit.locator("main ol li:nth-child(2) code").first.inner_text().strip()
    with audit.expect_download() as exported:
        audit.get_by_role("button", name=re.compile("Download a signed export")).click()
    export_path = tmp_path / exported.value.suggested_filename
    exported.value.save_as(export_path)
    with audit.expect_download() as verifier:
        audit.get_by_role("link", name="Download the verifier").click()
    verifier_path = tmp_path / "verify_audit_export.py"
    verifier.value.save_as(verifier_path)
    audrey.shot("export")
    checked = subprocess.run(
        [sys.executable, str(verifier_path), str(export_path), "--trust-fingerprint", fingerprint],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.startswith("VERIFIED:")

    # --- system admin: users, forced logout, health ----------------------------------------
    root = people("root")
    root.sign_in("root")
    admin = root.page
    admin.get_by_role("link", name="Users", exact=True).click()
    admin.locator("#user-name").fill("wendy")
    admin.locator("#user-password").fill(PASSWORD)
    admin.get_by_role("button", name="Create user").click()
    expect(admin.locator("main table")).to_contain_text("wendy")
    admin.get_by_role("link", name="Sessions", exact=True).click()
    row = admin.locator("tr", has_text="alice")
    row.get_by_role("button", name="Force logout").click()
    expect(admin.locator("main")).not_to_contain_text("alice")
    root.shot("sessions-after-forced-logout")
    page.goto(project_url)
    expect(page).to_have_url(re.compile(r".*/ui/sign-in\?next=.*"))
    admin.get_by_role("link", name="Health", exact=True).click()
    expect(admin.locator("main")).to_contain_text("host1")
    expect(admin.locator("main")).to_contain_text("answers HTTP 200")
    root.shot("health")


def test_a_viewer_sees_no_write_controls_and_posting_is_refused(people, appliance):
    alice = people("alice")
    alice.sign_in("alice")
    project_url = create_project(alice, "shared")
    alice.page.goto(project_url + "/members")
    alice.page.locator("#member-user").fill("victor")
    alice.page.get_by_role("button", name="Save").click()  # viewer is the first role

    victor = people("victor")
    victor.sign_in("victor")
    page = victor.page
    page.get_by_role("link", name="shared", exact=True).click()
    for section in ("Datasets", "Code", "Environments", "Runs", "Models", "Members", "Policy"):
        page.get_by_role("link", name=section, exact=True).click()
        forms = page.locator('main form[method="post"]')
        expect(forms).to_have_count(0)
    victor.shot("viewer-datasets")
    token = victor.csrf()  # the sign-out form's token: a valid token of victor's session
    refused = page.request.post(
        project_url + "/datasets", form={"name": "sneaky", "csrf_token": token}
    )
    assert refused.status == 403
    assert "Not allowed" in refused.text()

    audrey = people("audrey")
    audrey.sign_in("audrey")
    audrey.page.goto("/ui/audit?action=authz:request:denied&actor=user:victor")
    expect(audrey.page.locator("table.events tbody tr")).to_have_count(1)
    expect(audrey.page.locator("table.events")).to_contain_text("/datasets")
    audrey.shot("denial-audited")


def test_keyboard_only_sign_in_and_phone_width(people, appliance):
    phone = people("alice-phone", width=390)
    page = phone.page
    page.goto("/ui/projects")
    expect(page).to_have_url(re.compile(r".*/ui/sign-in.*"))
    page.keyboard.type("alice")  # the username field has focus on arrival
    page.keyboard.press("Tab")
    page.keyboard.type(PASSWORD)
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"^[^?]*/ui/projects$"))
    create_project(phone, "phone")
    for path in ("", "/datasets", "/runs", "/members", "/policy"):
        page.goto(page.url.split("/ui/projects/")[0] + "/ui/projects/" + _pid(page) + path)
        overflow = page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 1, f"{path or 'project'} scrolls sideways at phone width"
    phone.shot("phone-runs")


def _pid(page) -> str:
    return re.search(r"/ui/projects/(prj_[0-9a-z]+)", page.url).group(1)
