"""Django's own migrations through the SQLite engine: `migrate` of
django.contrib.contenttypes and django.contrib.auth (CREATE TABLE with
identity keys, foreign keys added by ALTER TABLE as DEFERRABLE INITIALLY
DEFERRED, varchar_pattern_ops indexes, ALTER COLUMN TYPE / DROP NOT NULL,
DROP COLUMN, SET CONSTRAINTS, the proxy-permissions data migration), then
the ORM over the tables it made. Printed line by line, so a run against
cutover's SQLite engine can be compared with a run against PostgreSQL.

usage: django_migrate.py DSN
"""

import io
import sys
import urllib.parse

import django
from django.conf import settings

url = urllib.parse.urlparse(sys.argv[1])
settings.configure(
    INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth"],
    USE_TZ=True,
    DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
    DATABASES={
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": url.path.lstrip("/"),
            "USER": urllib.parse.unquote(url.username or ""),
            "PASSWORD": urllib.parse.unquote(url.password or ""),
            "HOST": url.hostname,
            "PORT": url.port,
        }
    },
)
django.setup()

from django.contrib.auth.models import Group, Permission, User  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import IntegrityError, connection, transaction  # noqa: E402

TABLES = [
    "auth_user_user_permissions", "auth_user_groups", "auth_group_permissions", "auth_user",
    "auth_group", "auth_permission", "django_content_type", "django_migrations",
]
with connection.cursor() as c:
    for t in TABLES:
        c.execute(f"DROP TABLE IF EXISTS {t}")

log = io.StringIO()
call_command("migrate", verbosity=1, interactive=False, stdout=log)
for line in log.getvalue().splitlines():
    print(line.strip())
print("tables", sorted(t for t in connection.introspection.table_names() if t.startswith(("auth_", "django_"))))

editors, _ = Group.objects.get_or_create(name="editors")
alice = User.objects.create_user("alice", "alice@example.com", "pw", first_name="Alice")
alice.groups.add(editors)
editors.permissions.add(*Permission.objects.filter(codename__startswith="add_"))
print("permissions", sorted(editors.permissions.values_list("codename", flat=True)))
print("members", list(User.objects.filter(groups__name="editors").values_list("username", "first_name", "is_active")))
print("password", User.objects.get(username="alice").check_password("pw"))
print("last_login", User.objects.get(username="alice").last_login)
try:
    with transaction.atomic():
        User.objects.create_user("alice")
except IntegrityError as e:
    print("duplicate", e.__cause__.sqlstate)
try:
    with transaction.atomic():
        # The foreign key is DEFERRABLE INITIALLY DEFERRED: checked at commit.
        with connection.cursor() as c:
            c.execute("INSERT INTO auth_user_groups (user_id, group_id) VALUES (%s, 424242)", [alice.id])
except IntegrityError as e:
    print("foreign key at commit", e.__cause__.sqlstate)
print("memberships", alice.groups.count())
with connection.cursor() as c:
    for t in TABLES:
        c.execute(f"DROP TABLE {t}")
print("dropped", [t for t in connection.introspection.table_names() if t.startswith(("auth_", "django_"))])
