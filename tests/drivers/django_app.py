"""One Django app (5.2, psycopg 3) over the fixture's users and posts,
printed as JSON lines, so a run against cutover's SQLite engine can be
compared line for line with a run against the converted PostgreSQL.
Covers what Django sends that other ORMs do not: bulk_create's
`INSERT ... SELECT * FROM UNNEST(...)` with client-side binding, JSONField
lookups (`#>`, `?`, `?|`, `@>`, `<@`), savepoints from nested atomic().

usage: django_app.py DSN [users-table posts-table]
"""

import datetime
import json
import sys
import urllib.parse

import django
from django.conf import settings

url = urllib.parse.urlparse(sys.argv[1])
USERS, POSTS = (sys.argv[2], sys.argv[3]) if len(sys.argv) > 3 else ("users", "posts")
settings.configure(
    INSTALLED_APPS=[],
    USE_TZ=True,
    DATABASES={
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": url.path.lstrip("/"),
            "USER": urllib.parse.unquote(url.username or ""),
            "PASSWORD": urllib.parse.unquote(url.password or ""),
            "HOST": url.hostname,
            "PORT": str(url.port),
        }
    },
    DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
)
django.setup()

from django.db import IntegrityError, models, transaction  # noqa: E402
from django.db.models import Count, F, Sum  # noqa: E402


class User(models.Model):
    email = models.TextField(unique=True)
    name = models.TextField(null=True)
    is_admin = models.BooleanField(default=False)
    created_at = models.DateTimeField(null=True)
    prefs = models.JSONField(null=True)

    class Meta:
        app_label = "fixture"
        db_table = USERS
        managed = False


class Post(models.Model):
    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="posts", db_column="user_id")
    title = models.TextField()
    views = models.IntegerField(default=0)

    class Meta:
        app_label = "fixture"
        db_table = POSTS
        managed = False


def out(*parts):
    print(json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str))


out("users", list(User.objects.order_by("id").values_list("id", "email", "is_admin", "prefs")[:5]))
out("posts", list(Post.objects.select_related("user").filter(user_id__lte=3).order_by("id").values_list("title", "user__email")))
u = User.objects.create(
    email="django@example.com", name="Dj", prefs={"k": [1, 2], "s": "x"},
    created_at=datetime.datetime(2025, 6, 15, 15, 6, 40, tzinfo=datetime.timezone.utc),
)
made = Post.objects.bulk_create([Post(user=u, title=f"bulk {i}", views=i) for i in range(5)])
out("bulk ids consecutive", [p.id - made[0].id for p in made])
out("bulk rows", list(Post.objects.filter(user=u).order_by("id").values_list("title", "views")))
out("agg", list(Post.objects.filter(user_id__lte=3).values("user__email").annotate(n=Count("id"), v=Sum("views")).order_by("user__email").values_list("user__email", "n", "v")))
out("update", Post.objects.filter(user=u, views__gte=3).update(views=F("views") + 10))
with transaction.atomic():
    Post.objects.create(user=u, title="atomic")
    try:
        with transaction.atomic():
            User.objects.create(email=u.email)
    except IntegrityError:
        out("savepoint rolled back")
out("atomic", Post.objects.filter(user=u, title="atomic").count())
out("has_key", list(User.objects.filter(prefs__has_key="k").values_list("email", flat=True)))
out("has_any_keys", User.objects.filter(prefs__has_any_keys=["k", "nope"]).count())
out("contains", list(User.objects.filter(prefs__contains={"k": [2]}).values_list("email", flat=True)))
out("contained_by", User.objects.filter(id=u.id, prefs__contained_by={"k": [1, 2], "s": "x", "t": 1}).count())
out("key path", list(User.objects.filter(prefs__k__1=2).values_list("email", flat=True)))
out("key text", list(User.objects.filter(prefs__s="x").values_list("email", flat=True)))
out("delete", Post.objects.filter(user=u).delete())
out("get_or_create", User.objects.get_or_create(email=u.email)[1])
u.delete()
